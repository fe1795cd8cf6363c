"""jax_batchinhib: JAX/Flax layers whose backward passes are derived by hand.

Every op is a ``jax.custom_vjp`` whose backward rule is the derived one (see
``docs/derivations.md``), proved against autodiff of the naive forward in
:mod:`jax_batchinhib.reference`.

The ops are imported here; the submodules (``linen``, ``nnx``, ``reference``, ``fold``,
``parallel``, ``running``, ``testing``, ``apps``) are attributes loaded on first use
(PEP 562), so ``jbi.linen.BatchNorm`` works after a plain ``import jax_batchinhib as
jbi`` and ``import jax_batchinhib`` alone does not import flax.
"""

import importlib as _importlib

from jax_batchinhib.ops import BatchStats as BatchStats
from jax_batchinhib.ops import InhibStats as InhibStats
from jax_batchinhib.ops import WhiteningStats as WhiteningStats
from jax_batchinhib.ops import alpha_shape as alpha_shape
from jax_batchinhib.ops import batch_center as batch_center
from jax_batchinhib.ops import batch_center_inference as batch_center_inference
from jax_batchinhib.ops import batch_inhib as batch_inhib
from jax_batchinhib.ops import batch_inhib_inference as batch_inhib_inference
from jax_batchinhib.ops import batch_norm as batch_norm
from jax_batchinhib.ops import batch_norm_inference as batch_norm_inference
from jax_batchinhib.ops import dropout as dropout
from jax_batchinhib.ops import inhibition_matrix as inhibition_matrix
from jax_batchinhib.ops import iter_norm as iter_norm
from jax_batchinhib.ops import iter_norm_inference as iter_norm_inference
from jax_batchinhib.ops import softmax as softmax
from jax_batchinhib.ops import softmax_cross_entropy as softmax_cross_entropy
from jax_batchinhib.ops import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jax_batchinhib.ops import zca_norm as zca_norm
from jax_batchinhib.ops import zca_norm_inference as zca_norm_inference
from jax_batchinhib.testing import check_vjp as check_vjp

__version__ = "0.1.0"

#: Submodules loaded on first attribute access.
_LAZY = ("apps", "fold", "linen", "nnx", "parallel", "reference", "running", "testing")


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BatchStats",
    "InhibStats",
    "WhiteningStats",
    "alpha_shape",
    "batch_center",
    "batch_center_inference",
    "batch_inhib",
    "batch_inhib_inference",
    "batch_norm",
    "batch_norm_inference",
    "check_vjp",
    "dropout",
    "inhibition_matrix",
    "iter_norm",
    "iter_norm_inference",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "zca_norm",
    "zca_norm_inference",
]
