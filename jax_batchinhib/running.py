r"""Running statistics: the state the normalization modules keep, and how it is updated.

Batch normalization (Ioffe & Szegedy, 2015) replaces the mini-batch statistics at inference
by population estimates,

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

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _ghost
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops.batch_inhib import InhibOptions
from jax_batchinhib.ops.batch_norm import batch_center_for_running, batch_norm_for_running

Array = jax.Array


class RunningStats(NamedTuple):
    """The running statistics a normalization module keeps (a pytree).

    ``mean`` (N,) always; ``var`` (N,) for BatchNorm and BatchInhib; ``cov`` (alpha's
    shape) for BatchInhib; ``count`` (the number of batches averaged, int32: (N,) per
    feature, or () for BatchInhib, whose masks select whole rows) only with
    ``momentum=None``; ``whitening_matrix`` (groups, N/groups, N/groups) for IterNorm and
    ZCANorm (which keep ``mean``, ``whitening_matrix`` and a scalar ``count``). The field
    names are the stored variable names (linen
    ``batch_stats/<name>``, NNX attributes), the same as :class:`flax.linen.BatchNorm`'s.

    Attributes:
      mean: ``(N,)`` running mean.
      var: ``(N,)`` running variance, or None (BatchCenter).
      cov: running covariance of alpha's shape, or None (BatchNorm, BatchCenter).
      count: batches averaged so far, or None (``momentum`` a float).
    """

    mean: Array
    var: Array | None = None
    cov: Array | None = None
    count: Array | None = None
    whitening_matrix: Array | None = None

    def items(self):
        """``(name, value)`` of the statistics present (not None)."""
        return [(k, v) for k, v in zip(self._fields, self, strict=True) if v is not None]


def check_momentum(where: str, momentum) -> float | None:
    """``momentum`` must be None (cumulative average) or a float in [0, 1].

    Args:
      where: the caller's name, for the error.
      momentum: the value to check.

    Returns:
      ``momentum`` as a float, or None.
    """
    return C.momentum(where, momentum)


def stats_dtype(param_dtype, force_float32_reductions: bool = True):
    """dtype of stored running statistics: float32 (flax's choice) or wider.

    Statistics are stored in ``promote_types(param_dtype, float32)``: float32 for the
    default ``param_dtype`` and for bfloat16 or float16 parameters, as flax's; float64
    parameters keep float64 statistics. Never narrower than float32: a moving average
    stored in bfloat16 stalls, its steps rounding away (a running mean stuck at 65 where
    the data's mean is 100).

    Args:
      param_dtype: the module's parameter dtype.
      force_float32_reductions: accepted for flax's signature; the statistics are
        reduced in float32 or wider and stored as above either way.

    Returns:
      The dtype of the running statistics.
    """
    del force_float32_reductions  # the ops always reduce in float32 or wider
    return jnp.promote_types(param_dtype, jnp.float32)


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
    ``m/(m-1)`` (docs/derivations.md, "Running statistics"). Rows (positions) where
    ``mask`` is False are not counted; with ``axis_name`` the counts of every device are summed.

    Args:
      where: the caller's name, for errors.
      x: the input ``(..., N)``.
      axis: the feature axis.
      mask: as in :func:`jax_batchinhib.batch_norm`, or None.
      axis_name, axis_index_groups: sum the counts over these devices.

    Returns:
      The counts, ``(N,)`` float32.
    """
    cfg = S.make_reduce(where, x, axis, axis_name, axis_index_groups)
    n = cfg.feature_shape(x.shape)
    if mask is None:
        cnt = jnp.full(n, S.reduced_size(x.shape, cfg), jnp.float32)
    else:
        mask = S.mask_weights(where, mask, x.shape, cfg)
        w = jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), x.shape)
        cnt = jnp.sum(w, axis=cfg.reduce_axes)
    return cfg.psum(cnt)


def unbiased_factor(m, dtype=jnp.float32):
    """``m/(m-1)`` where ``m > 1``; 1 where ``m <= 1`` (a single value has no spread),
    computed in ``dtype`` (the statistic's: float64 statistics get a float64 factor).

    Args:
      m: the number of values per feature (array or number).
      dtype: the dtype to compute in.

    Returns:
      The factor, ``m``'s shape, in ``dtype``.
    """
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
    """The next batch count: ``count + 1`` where the batch counted (``valid``).

    Args:
      count: the number of batches averaged so far.
      valid: optional boolean broadcastable against ``count``; where False the count is
        kept.

    Returns:
      The new count, ``count``'s shape and dtype.
    """
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
    """Static number of values per feature on this device (before masking).

    Args:
      x: the input (only its shape is read).
      axis: the feature axis.

    Returns:
      The product of the sizes of every axis but ``axis``, a Python int.
    """
    ax = axis % x.ndim
    m = 1
    for a in range(x.ndim):
        if a != ax:
            m *= C.dim(x.shape[a])
    return m


@dataclasses.dataclass(frozen=True)
class Step:
    """How one forward of a statistics layer runs: the module's mode and options.

    Attributes:
      use_running_average: eval mode (running statistics) or training mode (batch
        statistics).
      update_stats: fold the batch statistics into the running state (False during a
        linen ``init``).
      momentum, unbiased: see the module docstring.
      axis: the feature axis (non-negative).
      axis_name, axis_index_groups: statistics across devices.
      use_autodiff: call the reference instead of the op.
      virtual_batch_size: ghost batches in training mode (eval mode ignores it), see
        :func:`_per_batch`.
      use_fast_variance: passed to the op.
    """

    use_running_average: bool
    update_stats: bool = True
    momentum: float | None = 0.99
    unbiased: bool = True
    axis: int | tuple[int, ...] = -1
    axis_name: Any = None
    axis_index_groups: Any = None
    use_autodiff: bool = False
    virtual_batch_size: int | None = None
    use_fast_variance: bool = True

    def __post_init__(self):
        # the functional steps are public: the flags and momentum are checked as the
        # modules check theirs ("False" is not False; momentum 1.5 diverges)
        where = "running.Step"
        for name in ("use_running_average", "update_stats", "unbiased", "use_autodiff",
                     "use_fast_variance"):  # fmt: skip
            object.__setattr__(self, name, C.flag(where, name, getattr(self, name)))
        object.__setattr__(self, "momentum", C.momentum(where, self.momentum))

    def counts(self, where, xs, mask):
        """Per-feature counted values of the batch ``xs`` (see :func:`batch_count`)."""
        return batch_count(
            where, xs, axis=self.axis, mask=mask, axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )  # fmt: skip


def _per_batch(where, one, x, mask, step: Step):
    """``one(xs, mask=...) -> (y, stats)`` on the whole batch or, with
    ``step.virtual_batch_size=v``, on each ghost batch of ``v`` rows (``ops/_ghost.py``:
    the op vmapped over sub-batches), the statistics averaged over the ghost batches that
    hold a valid position.

    ``one`` applies the ``m/(m-1)`` correction itself, so with ghost batches ``m`` is the
    count of one ghost batch (``v`` times the positions per example, times the devices
    of ``axis_name``), not of the whole batch, and the running variance is the average
    of the ghost batches' unbiased variances.
    """
    if step.virtual_batch_size is None:
        return one(x, mask=mask)
    axes = S.make_reduce(where, x, step.axis).axis
    return _ghost.ghost_batches(
        where, one, x, mask, step.virtual_batch_size, axes, step.axis_name,
        step.axis_index_groups,
    )  # fmt: skip


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


def _train(where, step: Step, op, x, state: RunningStats, mask, names, whole_rows=False):
    """Training mode of every layer: ``op(xs, mask=..., <step's options>)`` on the batch
    (or its ghost batches), its statistics ``names`` unbiased by ``m/(m-1)`` (all but the
    mean, with ``step.unbiased``; one count for whole-row masks), then folded into the
    running ``state``. Returns ``(y, new_state)``."""
    unbias = step.update_stats and step.unbiased

    def one(xs, *, mask):
        y, st = op(
            xs, axis=step.axis, axis_name=step.axis_name, mask=mask,
            axis_index_groups=step.axis_index_groups, use_fast_variance=step.use_fast_variance,
        )  # fmt: skip
        stats = [lax.stop_gradient(getattr(st, k)) for k in names]
        if unbias and len(stats) > 1:
            m = step.counts(where, xs, mask)
            m = jnp.ravel(m)[0] if whole_rows else m  # feature-shaped with tuple axes
            stats[1:] = [s * unbiased_factor(m, S.compute_dtype(s.dtype)) for s in stats[1:]]
        return y, tuple(stats)

    _check_state(where, state, names, step.momentum)
    y, batch = _per_batch(where, one, x, mask, step)
    if not step.update_stats:
        return y, state
    for k, b in zip(names, batch, strict=True):
        want = getattr(state, k).shape
        if math.prod(want) != b.size:
            raise ValueError(
                f"{where}: the running {k} has shape {tuple(want)}, but this batch's {k} "
                f"has {b.size} values (shape {tuple(b.shape)}); the state was made for "
                f"another input or layer"
            )
    batch = {k: jnp.reshape(b, getattr(state, k).shape) for k, b in zip(names, batch, strict=True)}
    valid = None if mask is None else step.counts(where, x, mask) > 0
    if valid is not None and whole_rows:
        valid = jnp.ravel(valid)[0]
    if step.momentum is None and valid is not None:
        try:
            grown = jnp.broadcast_shapes(jnp.shape(valid), state.count.shape) != state.count.shape
        except ValueError:
            grown = True
        if grown:
            raise ValueError(
                f"{where}: the running count has shape {tuple(state.count.shape)}, but this "
                f"batch counts per position of shape {tuple(jnp.shape(valid))} (its mask "
                f"selects values, not whole rows); make the count of that shape"
            )
    return y, _update_running(state, batch, momentum=step.momentum, valid=valid)


def _check_state(where: str, state, names, momentum) -> None:
    """The running state holds every statistic the layer updates (and a count for the
    cumulative average)."""
    missing = [k for k in names if getattr(state, k, None) is None]
    if momentum is None and getattr(state, "count", None) is None:
        missing.append("count")
    if missing:
        have = [k for k in state._fields if getattr(state, k) is not None]
        raise ValueError(
            f"{where}: the running state needs {', '.join(missing)} for this layer; got a "
            f"RunningStats with {', '.join(have) or 'nothing'} (another layer's state?)"
        )


def batch_norm_step(where: str, x, scale, bias, state: RunningStats, step: Step, *, epsilon, mask):
    """Batch norm in training mode (batch statistics, running update) or eval mode
    (running statistics). ``state`` holds ``mean``, ``var`` and, with momentum=None,
    ``count``.

    Args:
      where: the calling module's name, for errors.
      x: the input ``(..., N)``.
      scale, bias: ``(N,)`` or None.
      state: the :class:`RunningStats` before this batch.
      step: the module's mode and options.
      epsilon: added to the variance.
      mask: as in :func:`jax_batchinhib.batch_norm`, or None.

    Returns:
      ``(y, new_state)``; in eval mode, or with ``step.update_stats`` False, ``new_state``
      is ``state``.
    """
    impl = _impl(step.use_autodiff)
    if step.use_running_average:
        y = impl.batch_norm_inference(
            x, scale, bias, state.mean, state.var, axis=step.axis, epsilon=epsilon
        )
        return y, state
    bn = impl.batch_norm if step.use_autodiff else batch_norm_for_running
    op = functools.partial(bn, scale=scale, bias=bias, epsilon=epsilon)
    return _train(where, step, op, x, state, mask, ("mean", "var"))


def batch_center_step(where: str, x, bias, state: RunningStats, step: Step, *, mask):
    """Batch centering in training or eval mode; ``state`` holds ``mean`` (and
    ``count``).

    Args:
      where, x, state, step, mask: as in :func:`batch_norm_step`.
      bias: ``(N,)`` or None.

    Returns:
      ``(y, new_state)``, as :func:`batch_norm_step`.
    """
    impl = _impl(step.use_autodiff)
    if step.use_running_average:
        return impl.batch_center_inference(x, bias, state.mean, axis=step.axis), state
    bc = impl.batch_center if step.use_autodiff else batch_center_for_running
    op = functools.partial(bc, bias=bias)
    return _train(where, step, op, x, state, mask, ("mean",))


def batch_inhib_step(
    where: str, x, alpha, state: RunningStats, step: Step, *, options: InhibOptions, mask
):
    """BatchInhib in training mode (batch covariance, running update) or eval mode (the
    fixed linear map ``y = x (I - R^T)`` with R from the running covariance).

    ``state`` holds ``mean`` (N,), ``var`` (N,), ``cov`` (alpha's shape) and, with
    momentum=None, a scalar ``count``. ``options``: the op's options. The unbiased factor
    applies to the variance and the covariance alike (Pearson correlations do not
    depend on it, up to epsilon); BatchInhib masks whole rows, so every feature has the
    same count.

    Args:
      where, x, state, step, mask: as in :func:`batch_norm_step`.
      alpha: the inhibition weights, ``alpha_shape(N, groups)``.
      options: the op's :class:`~jax_batchinhib.ops.batch_inhib.InhibOptions`.

    Returns:
      ``(y, new_state)``, as :func:`batch_norm_step`.
    """
    impl = _impl(step.use_autodiff)
    if step.use_running_average:
        y = impl.batch_inhib_inference(x, alpha, state.cov, axis=step.axis, **options.kwargs())
        return y, state
    op = functools.partial(impl.batch_inhib, alpha=alpha, **options.kwargs())
    return _train(where, step, op, x, state, mask, ("mean", "var", "cov"), whole_rows=True)


def whitening_step(where: str, x, scale, bias, state: RunningStats, step: Step, *, options, mask):
    r"""IterNorm / ZCANorm in training mode (batch whitening, running update) or eval mode
    (one matmul per group, :math:`y = \gamma\odot(x-\mu_r)W_r + \beta`).

    ``options``: the module's ``WhitenOptions`` (method, groups, iterations, epsilon).
    ``state`` holds ``mean`` (N,), ``whitening_matrix`` (groups, N/groups, N/groups) and,
    with momentum=None, a scalar ``count``. As the papers' code keeps it (Huang et al.
    2018, 2019), the running whitening matrix is the moving (or cumulative) average of
    the batch whitening matrices :math:`W_B`, not a matrix function of a running
    covariance, and it is not corrected by ``m/(m-1)`` (``step.unbiased`` is ignored):
    eval mode applies the average of what training applied. The whitening ops mask whole
    rows, so every feature shares one count. Returns ``(y, new_state)``.
    """
    impl = _impl(step.use_autodiff)
    kw = {"groups": options.groups, "epsilon": options.epsilon}
    if options.method == "iter":
        train_op, inf_op = impl.iter_norm, impl.iter_norm_inference
        kw["iterations"] = options.iterations
    else:
        train_op, inf_op = impl.zca_norm, impl.zca_norm_inference
    if step.use_running_average:
        wm = state.whitening_matrix
        y = inf_op(x, scale, bias, state.mean, wm, groups=options.groups, axis=step.axis)
        return y, state

    def op(xs, *, axis, axis_name, mask, axis_index_groups, use_fast_variance):
        del use_fast_variance  # the whitening ops have one variance algorithm
        return train_op(
            xs, scale, bias, axis=axis, axis_name=axis_name, mask=mask,
            axis_index_groups=axis_index_groups, **kw,
        )  # fmt: skip

    step = dataclasses.replace(step, unbiased=False)
    return _train(where, step, op, x, state, mask, ("mean", "whitening_matrix"), whole_rows=True)
