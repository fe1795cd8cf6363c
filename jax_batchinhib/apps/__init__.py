"""The applications built on the library: the command line (``jax-batchinhib``), the
VJP verification run, training on digits and MNIST-1D, the example models, the
two-branch network chained by hand, and the benchmark harness.

The library core (:mod:`jax_batchinhib.ops`, ``reference``, ``testing``, ``running``,
``linen``, ``nnx``, ``fold``, ``parallel``) never imports from here; these modules may
use the ``examples`` extra (scikit-learn, tqdm, matplotlib, mnist1d).
"""
