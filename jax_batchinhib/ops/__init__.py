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
from jax_batchinhib.ops.softmax import softmax, softmax_cross_entropy

__all__ = [
    "BatchStats",
    "InhibStats",
    "alpha_shape",
    "batch_center",
    "batch_center_inference",
    "batch_inhib",
    "batch_inhib_inference",
    "batch_norm",
    "batch_norm_inference",
    "dropout",
    "inhibition_matrix",
    "keep_mask",
    "softmax",
    "softmax_cross_entropy",
]
