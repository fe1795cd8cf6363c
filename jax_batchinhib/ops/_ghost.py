"""Ghost (virtual) batches: statistics over sub-batches of the leading axis.

``op(x, ..., virtual_batch_size=v)`` splits the leading (batch) axis of ``x`` of length
``B`` into ``B / v`` sub-batches of ``v`` examples, normalizes each with its own
statistics (Keras's ``BatchNormalization(virtual_batch_size=v)``, Hoffer et al. 2017
"Train longer, generalize better"; asked of flax in its issue 332) and returns the
statistics averaged over the sub-batches: the mean over sub-batches of the per-sub-batch
mean, variance (biased, over ``v`` examples) and covariance, as Keras feeds its moving
averages.

The op itself is ``jax.vmap``-ed over the sub-batch axis, so each sub-batch goes through
the op's own custom VJP; parameters are shared (their gradients sum over the
sub-batches). With ``axis_name`` the ``j``-th sub-batch of every device forms one
statistics group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_batchinhib.ops import _checks as C


def check_virtual_batch_size(fn: str, x, axis: int, v) -> int:
    """Validate ``virtual_batch_size`` against ``x`` (``axis`` normalized); return it."""
    C.virtual_batch_size(fn, v)
    if x.ndim < 2 or axis == 0:
        raise ValueError(
            f"{fn}: virtual_batch_size splits the leading (batch) axis, which must not be the "
            f"feature axis; got x of shape {tuple(x.shape)} with feature axis {axis}"
        )
    b = int(x.shape[0])
    if b % v:
        raise ValueError(
            f"{fn}: virtual_batch_size={v} must divide the batch size {b} (x.shape[0]); "
            f"choose a divisor of {b} or pad the batch and pass a mask"
        )
    return v


def ghost_batches(fn: str, op, x, mask, v: int, axis: int):
    """Run ``op(x_sub, mask=mask_sub) -> (y_sub, stats)`` on each sub-batch of ``v`` rows.

    ``op`` closes over everything else (parameters, static options). Returns ``y`` of
    ``x``'s shape and the statistics averaged over the sub-batches.
    """
    check_virtual_batch_size(fn, x, axis, v)
    b = x.shape[0]
    xg = jnp.reshape(x, (b // v, v) + tuple(x.shape[1:]))
    if mask is None:
        y, stats = jax.vmap(lambda xs: op(xs, mask=None))(xg)
    else:
        mask = jnp.asarray(mask)
        if mask.ndim not in (x.ndim, x.ndim - 1):
            raise ValueError(
                f"{fn}: with virtual_batch_size the mask must have x's shape "
                f"{tuple(x.shape)} (or broadcast to it with the same number of dimensions) "
                f"or be a row mask without the feature axis; got shape {tuple(mask.shape)}"
            )
        mask = jnp.broadcast_to(mask, (b,) + tuple(mask.shape[1:]))
        mg = jnp.reshape(mask, (b // v, v) + tuple(mask.shape[1:]))
        y, stats = jax.vmap(lambda xs, ms: op(xs, mask=ms))(xg, mg)
    stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    return jnp.reshape(y, x.shape), stats
