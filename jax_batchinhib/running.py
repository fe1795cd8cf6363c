r"""Running statistics: the state the normalization modules keep, and how it is updated.

Seed 002 replaces the mini-batch statistics at inference by population estimates,

.. math::
    E[x] \leftarrow E_B[\mu_B], \qquad Var[x] \leftarrow \tfrac{m}{m-1}\,E_B[\sigma_B^2],

where ``m`` is the number of values per feature in a batch (rows times spatial positions;
padding excluded by a mask; summed over the devices of ``axis_name``). The modules keep
the same estimates as PyTorch's ``torch.nn.BatchNorm{1,2}d``:

- ``unbiased=True`` stores ``m/(m-1)`` times the biased batch variance (and covariance);
  ``unbiased=False`` stores the biased batch variance, exactly what ``flax.linen.BatchNorm``
  stores.
- ``momentum=None`` keeps the cumulative average over every batch seen,
  ``new = (1 - 1/k) old + (1/k) batch`` at the k-th batch (torch's ``momentum=None``), with
  the number of batches ``k`` kept in the ``count`` statistic.
- a float ``momentum`` keeps flax's exponential moving average
  ``new = momentum * old + (1 - momentum) * batch``. PyTorch's momentum ``p`` is our
  ``1 - p`` (torch's default 0.1 is our 0.9).

A batch in which a feature has no counted value (everything masked) leaves that
feature's statistics and count unchanged. Everything here is plain ``jax.numpy`` and is
applied under ``jax.lax.stop_gradient`` by the modules: running statistics are state,
not something the loss is differentiated through.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _ghost
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops.batch_inhib import InhibOptions

Array = jax.Array


class RunningStats(NamedTuple):
    """The running statistics a normalization module keeps (a pytree).

    ``mean`` (N,) always; ``var`` (N,) for BatchNorm and BatchInhib; ``cov`` (alpha's
    shape) for BatchInhib; ``count`` (the number of batches averaged, int32: (N,) per
    feature, or () for BatchInhib, whose masks select whole rows) only with
    ``momentum=None``. The field names are the stored variable names (linen
    ``batch_stats/<name>``, NNX attributes), the same as :class:`flax.linen.BatchNorm`'s.
    """

    mean: Array
    var: Array | None = None
    cov: Array | None = None
    count: Array | None = None

    def items(self):
        """``(name, value)`` of the statistics present (not None)."""
        return [(k, v) for k, v in zip(self._fields, self, strict=True) if v is not None]


def check_momentum(where: str, momentum) -> float | None:
    """``momentum`` must be None (cumulative average) or a float in [0, 1]."""
    return C.momentum(where, momentum)


def stats_dtype(param_dtype, force_float32_reductions: bool = True):
    """dtype of stored running statistics: float32 (flax's choice) or wider.

    With ``force_float32_reductions`` (the default, as in flax) statistics are stored in
    ``promote_types(param_dtype, float32)``: float32 for the default ``param_dtype``, the
    same as flax; float64 parameters keep float64 statistics.
    """
    if force_float32_reductions:
        return jnp.promote_types(param_dtype, jnp.float32)
    return jnp.dtype(param_dtype)


def batch_count(
    where: str,
    x,
    *,
    axis: int = -1,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
):
    """Number of counted values per feature, shape ``(N,)`` float32: the ``m`` of
    seed 002's ``m/(m-1)``. Rows (positions) where ``mask`` is False are not counted;
    with ``axis_name`` the counts of every device are summed."""
    cfg = S.make_reduce(where, x, axis)
    n = x.shape[cfg.axis]
    if mask is None:
        m = 1
        for a in cfg.reduce_axes:
            m *= int(x.shape[a])
        cnt = jnp.full((n,), m, jnp.float32)
    else:
        mask = S.mask_weights(where, mask, x.shape, cfg)
        w = jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), x.shape)
        cnt = jnp.sum(w, axis=cfg.reduce_axes)
    if axis_name is not None:
        cnt = lax.psum(cnt, axis_name, axis_index_groups=S.as_groups(axis_index_groups))
    return cnt


def unbiased_factor(m, dtype=jnp.float32):
    """``m/(m-1)`` where ``m > 1``; 1 where ``m <= 1`` (a single value has no spread),
    computed in ``dtype`` (the statistic's: float64 statistics get a float64 factor)."""
    m = jnp.asarray(m, dtype)
    return jnp.where(m > 1, m / jnp.maximum(m - 1, 1), 1.0)


def update(old, batch, *, momentum: float | None, count=None, valid=None):
    """One running-statistic update, in ``old``'s dtype.

    Args:
      old: the stored running statistic.
      batch: this batch's statistic (already corrected for bias if wanted).
      momentum: a float for the EMA ``momentum*old + (1-momentum)*batch`` (flax's
        expression, so ``unbiased=False`` reproduces flax to the bit up to the batch
        statistics), or None for the cumulative average.
      count: with ``momentum=None``, the number of batches already averaged (before this
        one); broadcastable against ``old``.
      valid: optional boolean broadcastable against ``old``: where False the statistic is
        left unchanged (a feature with no counted value in this batch).

    Returns:
      the new running statistic.
    """
    batch = lax.stop_gradient(batch).astype(old.dtype)
    if momentum is None:
        if count is None:
            raise ValueError("running.update: momentum=None needs count (batches seen so far)")
        k = (count + 1).astype(old.dtype)
        f = 1.0 / k
        new = (1.0 - f) * old + f * batch
    else:
        new = momentum * old + (1 - momentum) * batch
    if valid is not None:
        new = jnp.where(valid, new, old)
    return new.astype(old.dtype)


def update_count(count, valid=None):
    """The next batch count: ``count + 1`` where the batch counted (``valid``)."""
    inc = jnp.ones_like(count) if valid is None else jnp.asarray(valid).astype(count.dtype)
    return count + inc


# ============================================================ one step of each layer
#
# The modules (linen and NNX) hold parameters and statistics; these functions do the
# rest, so both module families share one implementation: call the op (or, with
# ``use_autodiff``, its reference in plain jnp), then update the statistics.


def _impl(use_autodiff: bool):
    if use_autodiff:
        from jax_batchinhib import reference

        return reference
    from jax_batchinhib import ops

    return ops


def values_per_feature(x, axis: int) -> int:
    """Static number of values per feature on this device (before masking)."""
    ax = axis % x.ndim
    m = 1
    for a in range(x.ndim):
        if a != ax:
            m *= int(x.shape[a])
    return m


def _valid(where, x, axis, mask, axis_name, axis_index_groups):
    """Per-feature 'some value counted in this batch' flag (None without a mask)."""
    if mask is None:
        return None
    m = batch_count(
        where, x, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    return m > 0


def _unbias(where, xs, axis, mask, axis_name, axis_index_groups, *stats, scalar=False):
    """The statistics of the batch ``xs`` times its own ``m/(m-1)`` (per feature, or one
    scalar ``m`` with ``scalar``: BatchInhib masks whole rows, so every feature has the
    same count)."""
    m = batch_count(
        where, xs, axis=axis, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
    m = m[0] if scalar else m
    return tuple(s * unbiased_factor(m, jnp.promote_types(s.dtype, jnp.float32)) for s in stats)


def _per_batch(where, one, x, mask, virtual_batch_size, axis):
    """``one(xs, mask=...) -> (y, stats)`` on the whole batch or, with
    ``virtual_batch_size=v``, on each ghost batch of ``v`` rows (``ops/_ghost.py``: the
    op vmapped over sub-batches), the statistics averaged over the ghost batches.

    ``one`` applies the ``m/(m-1)`` correction itself, so with ghost batches ``m`` is the
    count of one ghost batch (``v`` times the positions per example, times the devices
    of ``axis_name``), not of the whole batch, and the running variance is the average
    of the ghost batches' unbiased variances.
    """
    if virtual_batch_size is None:
        return one(x, mask=mask)
    return _ghost.ghost_batches(where, one, x, mask, virtual_batch_size, axis % x.ndim)


def _update_running(state: RunningStats, batch: dict, *, momentum, valid) -> RunningStats:
    """New running state: each ``batch`` statistic folded into ``state`` (EMA or
    cumulative), and the batch count advanced when ``momentum`` is None."""
    count = state.count
    new = {
        name: update(getattr(state, name), b, momentum=momentum, count=count, valid=valid)
        for name, b in batch.items()
    }
    if momentum is None:
        if count is None:
            raise ValueError("running: momentum=None needs the count statistic in the state")
        new["count"] = update_count(count, valid)
    return state._replace(**new)


def batch_norm_step(
    where: str,
    x,
    scale,
    bias,
    state: RunningStats,
    *,
    use_running_average: bool,
    update_stats: bool,
    momentum: float | None,
    unbiased: bool,
    epsilon: float,
    axis: int,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    use_autodiff: bool = False,
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = True,
):
    """Batch norm in training mode (batch statistics, running update) or eval mode
    (running statistics). ``state`` holds ``mean``, ``var`` and, with momentum=None,
    ``count``. ``virtual_batch_size``: ghost batches in training mode (ignored in eval
    mode); see :func:`_per_batch`. Returns ``(y, new_state)``."""
    impl = _impl(use_autodiff)
    if use_running_average:
        y = impl.batch_norm_inference(
            x, scale, bias, state.mean, state.var, axis=axis, epsilon=epsilon
        )
        return y, state

    def one(xs, *, mask):
        y, st = impl.batch_norm(
            xs,
            scale,
            bias,
            axis=axis,
            epsilon=epsilon,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=mask,
            use_fast_variance=use_fast_variance,
        )
        mean_b = lax.stop_gradient(st.mean)
        var_b = lax.stop_gradient(st.var)
        if update_stats and unbiased:
            (var_b,) = _unbias(where, xs, axis, mask, axis_name, axis_index_groups, var_b)
        return y, (mean_b, var_b)

    y, (mean_b, var_b) = _per_batch(where, one, x, mask, virtual_batch_size, axis)
    if not update_stats:
        return y, state
    valid = _valid(where, x, axis, mask, axis_name, axis_index_groups)
    return y, _update_running(state, {"mean": mean_b, "var": var_b}, momentum=momentum, valid=valid)


def batch_center_step(
    where: str,
    x,
    bias,
    state: RunningStats,
    *,
    use_running_average: bool,
    update_stats: bool,
    momentum: float | None,
    axis: int,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    use_autodiff: bool = False,
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = True,
):
    """Batch centering in training or eval mode; ``state`` holds ``mean`` (and
    ``count``); ``virtual_batch_size`` as :func:`batch_norm_step`. Returns
    ``(y, new_state)``."""
    impl = _impl(use_autodiff)
    if use_running_average:
        return impl.batch_center_inference(x, bias, state.mean, axis=axis), state

    def one(xs, *, mask):
        y, st = impl.batch_center(
            xs,
            bias,
            axis=axis,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=mask,
            use_fast_variance=use_fast_variance,
        )
        return y, lax.stop_gradient(st.mean)

    y, mean_b = _per_batch(where, one, x, mask, virtual_batch_size, axis)
    if not update_stats:
        return y, state
    valid = _valid(where, x, axis, mask, axis_name, axis_index_groups)
    return y, _update_running(state, {"mean": mean_b}, momentum=momentum, valid=valid)


def batch_inhib_step(
    where: str,
    x,
    alpha,
    state: RunningStats,
    *,
    use_running_average: bool,
    update_stats: bool,
    momentum: float | None,
    unbiased: bool,
    axis: int,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    use_autodiff: bool = False,
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = True,
    options: InhibOptions | None = None,
):
    """BatchInhib in training mode (batch covariance, running update) or eval mode (the
    fixed linear map ``y = x (I - R^T)`` with R from the running covariance).

    ``state`` holds ``mean`` (N,), ``var`` (N,), ``cov`` (alpha's shape) and, with
    momentum=None, a scalar ``count``. ``options``: the op's options
    (:class:`~jax_batchinhib.ops.batch_inhib.InhibOptions`; None: the defaults). The
    unbiased factor applies to the variance and the covariance alike (Pearson
    correlations do not depend on it, up to epsilon). ``virtual_batch_size``: ghost
    batches in training mode, as :func:`batch_norm_step`. Returns ``(y, new_state)``.
    """
    impl = _impl(use_autodiff)
    inhib = (InhibOptions() if options is None else options).kwargs()
    if use_running_average:
        y = impl.batch_inhib_inference(x, alpha, state.cov, axis=axis, **inhib)
        return y, state

    def one(xs, *, mask):
        y, st = impl.batch_inhib(
            xs,
            alpha,
            axis=axis,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            mask=mask,
            use_fast_variance=use_fast_variance,
            **inhib,
        )
        mean_b = lax.stop_gradient(st.mean)
        var_b = lax.stop_gradient(st.var)
        cov_b = lax.stop_gradient(st.cov)
        if update_stats and unbiased:
            var_b, cov_b = _unbias(
                where, xs, axis, mask, axis_name, axis_index_groups, var_b, cov_b, scalar=True
            )
        return y, (mean_b, var_b, cov_b)

    y, (mean_b, var_b, cov_b) = _per_batch(where, one, x, mask, virtual_batch_size, axis)
    if not update_stats:
        return y, state
    cov_b = jnp.reshape(cov_b, state.cov.shape)
    valid_s = _valid(where, x, axis, mask, axis_name, axis_index_groups)
    valid_s = None if valid_s is None else valid_s[0]
    batch = {"mean": mean_b, "var": var_b, "cov": cov_b}
    return y, _update_running(state, batch, momentum=momentum, valid=valid_s)
