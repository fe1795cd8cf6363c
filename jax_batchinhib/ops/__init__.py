"""The functional core: every op is a jax.custom_vjp with a hand-derived backward."""

from jax_batchinhib.ops.batch_inhib import (
    InhibStats,
    alpha_shape,
    batch_inhib,
    batch_inhib_inference,
    inhibition_matrix,
)
from jax_batchinhib.ops.batch_norm import (
    BatchStats,
    batch_center,
    batch_center_inference,
    batch_norm,
    batch_norm_inference,
)
from jax_batchinhib.ops.dropout import dropout, keep_mask
from jax_batchinhib.ops.softmax import (
    softmax,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jax_batchinhib.ops.whitening import (
    WhiteningStats,
    iter_norm,
    iter_norm_inference,
    zca_norm,
    zca_norm_inference,
)

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
    "dropout",
    "inhibition_matrix",
    "iter_norm",
    "iter_norm_inference",
    "keep_mask",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "zca_norm",
    "zca_norm_inference",
]
