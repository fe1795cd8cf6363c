r"""Flax linen modules: BatchNorm, BatchCenter, BatchInhib, IterNorm, ZCANorm and Dropout.

They hold parameters (collection ``params``) and running statistics (collection
``batch_stats``); the arithmetic is in the ops (:mod:`jax_batchinhib.ops`, hand-derived
VJPs) and the running-statistics rules in :mod:`jax_batchinhib.running`.

:class:`BatchNorm` is a drop-in replacement for :class:`flax.linen.BatchNorm`: the same
arguments with the same names, defaults and meaning, the same variables (``params``:
``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), no statistics update during
``init``. Two additions, both from Ioffe & Szegedy (2015) / PyTorch, and the first one
changes a default result:

- ``unbiased=True`` (default) stores ``m/(m-1)`` times the batch variance, like PyTorch,
  so the running ``var`` (and the eval output) differs from flax's by that factor on each
  batch's part; ``unbiased=False`` stores what flax stores, so a checkpoint moves between
  ``flax.linen.BatchNorm`` and ours both ways and the outputs agree
  (``tests/test_flax_interop.py``).
- ``momentum=None`` keeps the cumulative average over all batches (PyTorch's
  ``momentum=None``), with the number of batches in ``batch_stats/count``.

Every module takes ``use_autodiff``: False (default) calls the op with its hand-derived
``custom_vjp``; True calls the plain-jnp reference in :mod:`jax_batchinhib.reference` and
lets JAX differentiate it. Pure forward mode (``jax.jvp`` or ``jax.jacfwd`` of the
layer itself) does **not** work through a ``custom_vjp``: use ``use_autodiff=True`` when
you need it. Forward over reverse (``jax.hessian``, ``jax.jacfwd`` of ``jax.grad``)
works with either.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax_batchinhib import linen as bnn
  >>> bn = bnn.BatchNorm(momentum=0.9)
  >>> x = jax.random.normal(jax.random.key(0), (8, 3))
  >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
  >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  >>> sorted(updates["batch_stats"])
  ['mean', 'var']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jax_batchinhib import _modules as M
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops.batch_inhib import alpha_shape
from jax_batchinhib.running import RunningStats

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = [
    "BatchCenter",
    "BatchInhib",
    "BatchNorm",
    "Dropout",
    "IterNorm",
    "ZCANorm",
    "near_identity_alpha_init",
]

near_identity_alpha_init = M.near_identity_alpha_init


# ----------------------------------------------------------------------------- helpers


def _where(mdl) -> str:
    name = getattr(mdl, "name", None)
    cls = type(mdl).__name__
    return f"{cls} '{name}'" if name else cls


def _existing(mdl, col, name, want, where, n):
    """A variable that exists already must have the shape the input asks for."""
    if mdl.has_variable(col, name):
        # a boxed value (nn.with_partitioning / with_logical_partitioning) has the shape
        # of what it holds
        got = tuple(jnp.shape(nn.meta.unbox(mdl.get_variable(col, name))))
        if got != tuple(want):
            raise ValueError(
                f"{where}: {col}/{name} has shape {S.shape_str(got)}, but x with {n} features "
                f"needs {S.shape_str(want)}; the variables were made for another input "
                f"(re-init, or give x with the feature count they were made for)"
            )


def _param(mdl, name, init, shape, where, n):
    M.check_initializer(where, f"{name}_init", init)
    _existing(mdl, "params", name, shape, where, n)
    return mdl.param(name, init, shape, mdl.param_dtype)


def _run(mdl, kind, where, x, use_ra, mask, ax, momentum, make_params, options=None):
    """The shared body of the statistics layers: the ``batch_stats`` variables, the
    parameters (``make_params()``), no update during ``init``, the step, and the
    write-back."""
    fshape = M.feature_shape(x, ax)
    # BatchInhib keeps flat (N,) statistics with N the product of the feature axes' sizes
    n = math.prod(fshape) if len(fshape) == 1 or kind == "batch_inhib" else fshape
    groups = 1 if options is None else options.groups
    specs = M.stat_specs(kind, n, M.stats_dtype(mdl), momentum, groups)
    stats = {}
    for name, (shape, init_fn) in specs.items():
        _existing(mdl, "batch_stats", name, shape, where, n)
        stats[name] = mdl.variable("batch_stats", name, init_fn)
    params = make_params()
    init = mdl.is_initializing()
    axis_name = None if init else mdl.axis_name
    vbs = getattr(mdl, "virtual_batch_size", None)
    if init and not use_ra and not M.training_form_ok(x, ax, mask, axis_name, vbs):
        use_ra = True
    y, new = M.apply(
        kind, where, mdl, x, params, RunningStats(**{k: v.value for k, v in stats.items()}),
        axis=ax, use_running_average=use_ra, update_stats=not init, momentum=momentum,
        axis_name=axis_name, mask=mask, options=options,
    )  # fmt: skip
    if not use_ra and not init:
        for name, value in new.items():
            stats[name].value = value
    return y


def _start(mdl, x, use_running_average, mask):
    """Checks every layer does first: returns (where, use_ra, feature axis, momentum)."""
    where = _where(mdl)
    ax = M.check_input(where, x, mdl.axis, mask)
    use_ra = M.merge_flag(
        where, "use_running_average", mdl.use_running_average, use_running_average
    )
    momentum = M.check_common(where, mdl)
    return where, use_ra, ax, momentum


# ------------------------------------------------------------------------------ modules


class BatchNorm(nn.Module):
    """Batch normalization (flax.linen.BatchNorm's interface) with a hand-derived VJP.

    Attributes: as :class:`flax.linen.BatchNorm` (``use_running_average``, ``axis``,
    ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``,
    ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``), plus:

    - ``axis``: one feature axis, or a tuple of them as flax's (statistics per feature
      position over every other axis; ``scale``, ``bias`` and the statistics take the
      shape of those axes, e.g. ``(H, C)``). Also on BatchCenter, and on BatchInhib,
      which flattens them into N features (alpha (N, N), flat statistics).
    - ``momentum``: a float (EMA, flax's meaning) or None (cumulative average over all
      batches, with ``batch_stats/count``).
    - ``unbiased``: store m/(m-1) times the batch variance (True, PyTorch's and Ioffe &
      Szegedy's) or the biased batch variance (False, flax's).
    - ``use_autodiff``: differentiate the plain-jnp reference instead of using the
      hand-derived VJP (needed for pure forward mode: jax.jvp / jacfwd of the layer).
    - ``virtual_batch_size``: ghost batches (Keras's ``virtual_batch_size``): in
      training mode each run of this many examples along the leading axis is normalized
      with its own statistics (it must divide ``x.shape[0]``), and the running
      statistics are updated with the average over the ghost batches of their statistics
      (with a mask, over the ghost batches that hold a valid value; an empty one, padding
      say, is left out),
      each unbiased with its own count (``m = virtual_batch_size`` times the positions
      per example). Eval mode ignores it. The same attribute on every module.

    ``use_fast_variance`` selects the op's variance algorithm, as flax's does (passed to
    :func:`jax_batchinhib.batch_norm`). Statistics are always accumulated in at least
    float32, and stored in ``promote_types(param_dtype, float32)``
    (:func:`jax_batchinhib.running.stats_dtype`): with float64 inputs (``jax_enable_x64``)
    pass ``param_dtype=jnp.float64`` to keep them in float64 (flax.linen's change from
    float32 to float64 at their first update, flax.nnx's stay float32).
    ``force_float32_reductions`` is accepted for flax's signature only: the ops reduce
    in float32 or wider, and statistics are stored in at least float32, either way
    (``False`` gives no bfloat16 reductions here). ``init`` on one value per feature (a
    dummy batch of one) runs the inference form, since the training form needs two: its
    output is ``x / sqrt(1 + epsilon)`` with the initial statistics, where flax's is the
    training form's zeros; the variables made are the same.
    Complex inputs are refused with a TypeError (flax's BatchNorm accepts
    them; the ops and their hand-derived VJPs are written for real floating point); so
    do BatchCenter and BatchInhib.

    ``mask`` differs from flax's in two ways (every module here): a mask of x's shape
    without the feature axes is a row mask, also where it would broadcast to x as a
    feature mask (flax reads a (4,) mask for x of shape (4, 4) that way; spell it (1, 4)
    here), and outputs at masked positions are constants to differentiation (their
    cotangents are dropped, so padding may hold NaN or inf; flax differentiates them, so
    the gradients agree with flax's when the loss ignores the masked outputs, as a
    padded batch's loss does; ``docs/derivations.md``, "Masks select").
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` with batch statistics (training) or running ones (eval).

        Args:
          x: the input, features on ``axis``.
          use_running_average: overrides nothing: give it here or at construction.
          mask: boolean, of a shape that broadcasts to x (flax's) or x's shape without
            the feature axes (rows); as :func:`jax_batchinhib.batch_norm`'s: positions
            counted in the statistics (and in the count m).
        """
        where, use_ra, ax, momentum = _start(self, x, use_running_average, mask)
        fshape = M.feature_shape(x, ax)
        n = math.prod(fshape)

        def params():
            use = {"scale": self.use_scale, "bias": self.use_bias}
            inits = {"scale": self.scale_init, "bias": self.bias_init}
            return tuple(
                _param(self, k, inits[k], fshape, where, n) if use[k] else None for k in use
            )

        return _run(self, "batch_norm", where, x, use_ra, mask, ax, momentum, params)


class BatchCenter(nn.Module):
    """Batch centering (a mean-only layer): ``y = x - mean + bias``.

    Training mode subtracts the batch mean and updates the running mean
    (``batch_stats/mean``; with ``momentum=None`` also ``batch_stats/count``); eval mode
    subtracts the running mean. Parameter: ``params/bias`` (when ``use_bias``).

    Attributes:
      use_running_average, axis, momentum, dtype, param_dtype, use_bias, bias_init,
        axis_name, axis_index_groups, force_float32_reductions, use_fast_variance,
        use_autodiff, virtual_batch_size: as in :class:`BatchNorm` (no scale, no
        epsilon, no variance).
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    bias_init: Initializer = initializers.zeros
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    use_fast_variance: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where, use_ra, ax, momentum = _start(self, x, use_running_average, mask)
        fshape = M.feature_shape(x, ax)
        n = math.prod(fshape)

        def params():
            return (
                _param(self, "bias", self.bias_init, fshape, where, n) if self.use_bias else None,
            )

        return _run(self, "batch_center", where, x, use_ra, mask, ax, momentum, params)


class BatchInhib(nn.Module):
    r"""BatchInhib: features inhibit each other through their correlation.

    Derivation: docs/derivations.md, "3. batch_inhib".

    Training mode: ``y = x - x R^T`` with R from the batch covariance (see
    :func:`jax_batchinhib.batch_inhib`), and the running mean, variance and covariance
    are updated like BatchNorm's (``momentum``, ``unbiased``). Eval mode: the fixed
    linear map ``y = x (I - R^T)`` with R from the running covariance
    (:func:`jax_batchinhib.batch_inhib_inference`).

    Variables: ``params/alpha`` of shape ``(N, N)`` (or ``(groups, N/groups, N/groups)``),
    initialized by :func:`near_identity_alpha_init` unless ``alpha_init`` is given;
    ``batch_stats/mean`` (N,), ``var`` (N,), ``cov`` (alpha's shape; initialized to the
    identity, which makes R = 0 before any statistics are seen) and, with
    ``momentum=None``, ``count`` ().

    ``axis``: one feature axis (N its size), or a tuple of them (e.g. ``(1, 3)``): the
    feature axes are moved last and flattened, in increasing axis order, into
    N = the product of their sizes features that all inhibit each other, as
    ``batch_inhib(x, alpha, axis=(1, 3))``; alpha stays (N, N) (or grouped) and
    ``mean``, ``var`` stay flat (N,). ``mask``: x's shape without the feature axes
    (whole rows), as for one axis.

    Attributes:
      rho, epsilon, groups, correlation, denominator, guard, guard_mode: the op's
        options (:func:`jax_batchinhib.batch_inhib`), validated once as an
        :class:`~jax_batchinhib.ops.batch_inhib.InhibOptions`.
      alpha_init: initializer of ``alpha`` (None: :func:`near_identity_alpha_init`).
      use_running_average, axis, momentum, dtype, param_dtype, axis_name,
        axis_index_groups, force_float32_reductions, use_fast_variance, unbiased,
        use_autodiff, virtual_batch_size: as in :class:`BatchNorm`.
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    rho: float = 1.0
    groups: int = 1
    correlation: str = "pearson"
    denominator: str = "signed"
    guard: float | None = None  # None: 1e-3 (absolute) or 0.5 (relative guard_mode)
    guard_mode: str = "absolute"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    alpha_init: Initializer | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    use_fast_variance: bool = False  # two-pass covariance: see ops.batch_inhib
    unbiased: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where, use_ra, ax, momentum = _start(self, x, use_running_average, mask)
        n = math.prod(M.feature_shape(x, ax))
        options = M.inhib_options(where, self, n)
        init_fn = self.alpha_init or near_identity_alpha_init(options.rho)
        ashape = alpha_shape(n, options.groups)
        alpha = _param(self, "alpha", init_fn, ashape, where, n)
        return _run(
            self, "batch_inhib", where, x, use_ra, mask, ax, momentum, lambda: (alpha,), options
        )


_WHITEN_DOC = r"""

    Training mode whitens with the batch statistics (per group of ``N/groups``
    contiguous features, rows masked by ``mask`` not counted) and updates the running
    mean and the running whitening matrix: as the papers' code keeps them (Huang et al.
    2018, 2019), the running W is the moving average (float ``momentum``) or the
    cumulative average (``momentum=None``, with ``batch_stats/count``) of the batch
    whitening matrices, without an ``m/(m-1)`` correction (these modules have no
    ``unbiased`` option). Eval mode is one matmul per group,
    ``y = scale * (x - mean) W + bias``.

    Variables: ``params/scale`` and ``params/bias`` (N,) (``use_scale`` / ``use_bias``);
    ``batch_stats/mean`` (N,), ``batch_stats/whitening_matrix`` (groups, N/groups,
    N/groups), initialized to the identity, and with ``momentum=None`` a scalar
    ``batch_stats/count``. The other attributes are BatchNorm's (``axis``, ``epsilon``
    (> 0), ``dtype``, ``param_dtype``, ``*_init``, ``axis_name``, ``axis_index_groups``,
    ``force_float32_reductions``, ``use_autodiff``: the plain-jnp reference instead of
    the hand-derived VJP, ``virtual_batch_size``: ghost batches). Fold an eval-mode layer
    into the Dense before it with :func:`jax_batchinhib.fold.fold_whitening_after`.
    """


def _whiten_call(mdl, kind, x, use_running_average, mask):
    where, use_ra, ax, momentum = _start(mdl, x, use_running_average, mask)
    ax = M.single_axis(where, mdl.axis, ax)
    n = x.shape[ax]
    options = M.WhitenOptions.checked(where, kind, mdl, n)

    def params():
        use = {"scale": mdl.use_scale, "bias": mdl.use_bias}
        inits = {"scale": mdl.scale_init, "bias": mdl.bias_init}
        return tuple(_param(mdl, k, inits[k], (n,), where, n) if use[k] else None for k in use)

    return _run(mdl, kind, where, x, use_ra, mask, ax, momentum, params, options)


class IterNorm(nn.Module):
    __doc__ = (
        "IterNorm (Huang et al., CVPR 2019): batch whitening by ``iterations`` Newton "
        "steps (:func:`jax_batchinhib.iter_norm`), with a hand-derived VJP." + _WHITEN_DOC
    )

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    groups: int = 1
    iterations: int = 5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Whiten ``x``; ``mask``: rows (x's shape without the feature axis) counted."""
        return _whiten_call(self, "iter_norm", x, use_running_average, mask)


class ZCANorm(nn.Module):
    __doc__ = (
        "ZCA batch whitening, decorrelated batch norm (Huang et al., CVPR 2018; "
        ":func:`jax_batchinhib.zca_norm`), with a hand-derived VJP." + _WHITEN_DOC
    )

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    groups: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Whiten ``x``; ``mask``: rows (x's shape without the feature axis) counted."""
        return _whiten_call(self, "zca_norm", x, use_running_average, mask)


class Dropout(nn.Module):
    """Inverted dropout (flax.linen.Dropout's interface) with the op's hand-derived VJP.

    The same key draws the same mask as :class:`flax.linen.Dropout`
    (``bernoulli(key, 1 - rate, shape)``) and gives flax's output bit for bit, in every
    dtype (the op divides by ``1 - rate`` as flax does, in ``x``'s dtype, and so does
    the reference that ``use_autodiff=True`` runs). The key comes from the
    ``rng_collection`` ('dropout') unless ``rng`` is given. ``broadcast_dims`` (flax's
    meaning): the axes along which one mask entry is shared (spatial dropout), given to
    the op.

    Attributes:
      rate: the probability of dropping an entry, a float in [0, 1].
      broadcast_dims: the axes that share one mask entry (above).
      deterministic: True: identity; may be given at call time instead.
      rng_collection: the rng stream the mask's key comes from.
      use_autodiff: autodiff of the reference instead of the op's custom VJP.
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    use_autodiff: bool = False

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        where = _where(self)
        M.check_dropout(where, self.rate, self.broadcast_dims)
        det = M.merge_flag(where, "deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or det:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return M.dropout(where, self.rate, self.use_autodiff, inputs, rng, self.broadcast_dims)
