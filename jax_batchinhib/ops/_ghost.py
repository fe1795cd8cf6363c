"""Ghost (virtual) batches: statistics over sub-batches of the leading axis.

``op(x, ..., virtual_batch_size=v)`` splits the leading (batch) axis of ``x`` of length
``B`` into ``B / v`` sub-batches of ``v`` examples, normalizes each with its own
statistics (Keras's ``BatchNormalization(virtual_batch_size=v)``, Hoffer et al. 2017
"Train longer, generalize better"; flax's BatchNorm does not offer it) and returns the
statistics averaged over the sub-batches: the mean over sub-batches of the per-sub-batch
mean, variance (biased, over ``v`` examples) and covariance, as Keras feeds its moving
averages. With a mask, a sub-batch with no valid position (for a feature, with an
element mask) has no statistics and is left out of that average: padding that fills a
whole sub-batch would otherwise pull the mean and variance toward 0.

The op itself is ``jax.vmap``-ed over the sub-batch axis, so each sub-batch goes through
the op's own custom VJP; parameters are shared (their gradients sum over the
sub-batches). With ``axis_name`` the ``j``-th sub-batch of every device forms one
statistics group.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import export

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S


def check_virtual_batch_size(fn: str, x, axis, v) -> int:
    """Validate ``virtual_batch_size`` against ``x`` (``axis`` normalized: an int or a
    tuple of feature axes); return it."""
    C.virtual_batch_size(fn, v)
    if x.ndim < 2 or 0 in (axis if isinstance(axis, tuple) else (axis,)):
        raise ValueError(
            f"{fn}: virtual_batch_size splits the leading (batch) axis, which must not be the "
            f"feature axis; got x of shape {tuple(x.shape)} with feature axis {axis}"
        )
    b = C.dim(x.shape[0])
    if export.is_symbolic_dim(b % v):  # jax.export with a symbolic batch size
        raise ValueError(
            f"{fn}: virtual_batch_size={v} must divide the batch size, which is symbolic "
            f"({b}) and not known to be a multiple of {v}; export with a multiple, e.g. "
            f"jax.export.symbolic_shape('{v}*b, ...')"
        )
    if b == 0:
        raise ValueError(
            f"{fn}: virtual_batch_size={v} splits the leading axis into sub-batches, but x of "
            f"shape {tuple(x.shape)} has no rows; training-mode statistics need values"
        )
    if b % v:
        raise ValueError(
            f"{fn}: virtual_batch_size={v} must divide the batch size {b} (x.shape[0]); "
            f"choose a divisor of {b} or pad the batch and pass a mask"
        )
    spec = S.explicit_spec(x)
    if spec is not None and spec[0] is not None:
        # rows sharded on an Explicit mesh: the split into (b / v, v) must keep whole
        # sub-batches on each device, which the typed reshape requires
        names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        sizes = jax.typeof(x).sharding.mesh.shape
        devices = math.prod(sizes[n] for n in names)
        if (b // v) % devices:
            raise NotImplementedError(
                f"{fn}: virtual_batch_size={v} splits the {b} rows into {b // v} ghost "
                f"batches, which x's rows, sharded over {devices} devices on an Explicit "
                f"mesh, do not divide evenly among; choose virtual_batch_size so that "
                f"{b} / virtual_batch_size is a multiple of {devices} (at most {b // devices})"
            )
    return v


def ghost_batches(fn: str, op, x, mask, v: int, axis, axis_name=None, axis_index_groups=None):
    """Run ``op(x_sub, mask=mask_sub) -> (y_sub, stats)`` on each sub-batch of ``v`` rows.

    ``op`` closes over everything else (parameters, static options; ``axis_name`` and
    ``axis_index_groups`` are passed here too, so that a sub-batch counts as empty only
    when it is empty on every device). Returns ``y`` of ``x``'s shape and the statistics
    averaged over the sub-batches that hold a valid position (see :func:`_average`).
    """
    check_virtual_batch_size(fn, x, axis, v)
    b = x.shape[0]
    xg = jnp.reshape(x, (b // v, v) + tuple(x.shape[1:]))
    if mask is None:
        y, stats = jax.vmap(lambda xs: op(xs, mask=None))(xg)
    else:
        cfg = S.make_reduce(fn, x, axis, axis_name, axis_index_groups)  # a sub-batch's too
        # x's rank before splitting (a row mask gets feature dimensions of 1), so that
        # each sub-batch's mask has its sub-batch's rank and reads the same way
        mask = S.mask_shape(fn, mask, x.shape, cfg.axes)
        mask = jnp.broadcast_to(mask, (b,) + tuple(mask.shape[1:]))
        spec = S.explicit_spec(x)
        if spec is not None:  # the sub-batches of mask and x must be sharded alike
            mask = jax.sharding.reshard(mask, S.named(x, spec[0], *(None,) * (mask.ndim - 1)))
        mg = jnp.reshape(mask, (b // v, v) + tuple(mask.shape[1:]))
        y, stats = jax.vmap(lambda xs, ms: op(xs, mask=ms))(xg, mg)
        sub = xg.shape[1:]

        def count(ms):  # per feature, summed across the devices of axis_name
            return S.count(sub, S.mask_bool(S.mask_weights(fn, ms, sub, cfg)), cfg, jnp.float32)

        valid = jnp.reshape(jax.vmap(count)(mg) > 0, (b // v, -1))  # (sub-batches, features)
        return jnp.reshape(y, x.shape), jax.tree.map(lambda s: _average(s, valid), stats)
    stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    return jnp.reshape(y, x.shape), stats


def _average(s, valid):
    """Mean over the leading (sub-batch) axis of ``s`` over the sub-batches where
    ``valid``: ``valid`` is (sub-batches, N) per feature; a feature-sized statistic
    (mean, variance) is averaged per feature, any other (a covariance, a whitening
    matrix: row masks only) over the sub-batches with any valid position. A statistic
    of a feature with no valid position anywhere is 0, as without ghost batches."""
    k = s.shape[0]
    if math.prod(s.shape[1:]) == valid.shape[1]:
        w = jnp.reshape(valid, s.shape)
    else:
        w = jnp.reshape(jnp.any(valid, axis=1), (k,) + (1,) * (s.ndim - 1))
    total = jnp.sum(jnp.where(w, s, jnp.zeros((), s.dtype)), axis=0)
    return total / jnp.maximum(jnp.sum(w, axis=0), 1).astype(s.dtype)
