"""Batch normalization and batch centering with hand-derived backward passes.

Public wrappers validate their arguments at trace time and carry the docstrings; the
private ``_batch_norm`` / ``_batch_center`` carry ``jax.custom_vjp`` with their
``_fwd`` / ``_bwd`` rules next to them. See ``docs/derivations.md`` for the derivations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _ghost
from jax_batchinhib.ops import _stats as S

Array = jax.Array


class BatchStats(NamedTuple):
    """Per-feature batch statistics (float32 or wider).

    Attributes:
      mean: ``(N,)`` batch mean.
      var: ``(N,)`` biased batch variance, or None (:func:`batch_center`).
    """

    mean: Array
    var: Array | None = None


def _vec(v, cfg: S.Reduce, dtype):
    """A per-feature vector (shape (N,), or the feature shape) reshaped to broadcast
    along the feature axes."""
    if v is None:
        return None
    feat = tuple(v.shape) if v.ndim == len(cfg.axes) else (v.shape[0],)
    return jnp.reshape(v.astype(dtype), cfg.keep_shape(feat))


def _squeeze(v, cfg: S.Reduce):
    """A keepdims per-feature array as the feature shape ((N,) for one feature axis)."""
    return jnp.reshape(v, cfg.feature_shape(v.shape))


def _grad_vec(g, cfg: S.Reduce, like):
    """Reduce an x-shaped product to a per-feature gradient in the parameter's dtype."""
    if like is None:
        return None
    return jnp.reshape(jnp.sum(g, axis=cfg.reduce_axes), like.shape).astype(like.dtype)


# ============================================================================ batch_norm


def batch_norm(
    x,
    scale=None,
    bias=None,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = True,
):
    r"""Batch normalization with a hand-derived VJP.

    Forward, per feature over every axis but ``axis`` (and across devices of
    ``axis_name``), counting only the values where ``mask`` is True:

    .. math::
        \mu = \tfrac1n\sum_j x_j,\quad \sigma^2 = \tfrac1n\sum_j (x_j-\mu)^2,\quad
        \hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon},\quad y = \gamma\hat x + \beta

    Backward (docs/derivations.md, "1. batch_norm"), with :math:`d\hat x = \gamma\,dy`:

    .. math::
        dx = \frac{1}{n\sqrt{\sigma^2+\epsilon}}\Big(n\,d\hat x - \sum d\hat x
             - \hat x\sum d\hat x\,\hat x\Big),\quad
        d\gamma = \sum dy\,\hat x,\quad d\beta = \sum dy

    The statistics are outputs too and gradients flow through them correctly
    (:math:`dx \mathrel{+}= d\mu/n + 2(x-\mu)\,d\sigma^2/n`). The statistics are
    accumulated in float32 (or float64) on ``d = x - s``, ``s`` a sample of each feature
    taken from the data (the first valid one), so they survive a large mean: with
    ``use_fast_variance`` in one read of ``x`` (``Σd`` and ``Σd²`` together), else in two
    (``docs/derivations.md``, "Numerics"). The backward keeps ``x`` and per-feature
    vectors only.

    Args:
      x: floating array ``(..., N)``; float16/bfloat16 accumulate in float32 and ``y``
        keeps ``x``'s dtype.
      scale, bias: ``(N,)`` or None (then 1 and 0).
      axis: the feature axis, or a tuple of feature axes (flax's convention: the
        statistics reduce over every other axis, and ``scale``, ``bias``, ``mean`` and
        ``var`` have the feature shape, the sizes along those axes in increasing order).
      epsilon: added to the variance.
      axis_name, axis_index_groups: sum the statistics across the devices of this
        mapped axis (``shard_map``/``pmap``); see ``docs/scaling.md`` for which
        gradients come out summed over devices. Without ``axis_name`` the groups are
        unused (as flax's).
      mask: boolean (or integer 0/1), of a shape that broadcasts to x (flax's
        reading), or x's shape without the feature axes (a row mask; always rows, also
        where flax would broadcast it: shape (4,) for x of shape (4, 4) masks rows here,
        features in flax, which (1, 4) spells here). False entries are selected away
        from the statistics and the count, so they may hold anything (NaN, inf). Their
        outputs are still normalized (as flax does: NaN stays NaN there), but they are
        constants to differentiation: a cotangent there reaches no gradient, and dx is
        0 there (``docs/derivations.md``, "Masks select").
      virtual_batch_size: ghost batches: normalize each run of this many examples along
        the leading axis with its own statistics (it must divide ``x.shape[0]``); the
        returned statistics are then the mean over the sub-batches of their mean and var
        (with a mask, over the sub-batches that hold a valid value of that feature: an
        empty sub-batch has no statistics).
      use_fast_variance: True (default, as flax): the shifted one-pass variance
        ``Σd²/n - (Σd/n)²``, one read of ``x`` for the statistics, and the backward's
        ``Σdy·x̂`` shifted alike, ``inv·(Σdy·d - mean_d·Σdy)``; False: the shifted
        two-pass ``Σ(d - mean_d)²/n`` and ``Σdy·x̂`` itself. Both are accurate to
        float32 round-off times ``1 + (mean - s)²/var`` (``docs/derivations.md``,
        "Numerics").

    Returns:
      ``(y, BatchStats(mean, var))`` with ``mean``/``var`` of shape ``(N,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import batch_norm
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> y, stats = batch_norm(x, jnp.ones(3), jnp.zeros(3))
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-6))
      True
    """
    return _batch_norm_entry(
        True, x, scale, bias, axis=axis, epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=mask,
        virtual_batch_size=virtual_batch_size, use_fast_variance=use_fast_variance,
    )  # fmt: skip


def batch_norm_for_running(x, scale=None, bias=None, **kwargs):
    """:func:`batch_norm` for the modules' running averages: the statistics left as the
    psum gives them, unbatched under ``jax.vmap(axis_name=...)`` as flax's, so that
    ``nn.vmap`` may broadcast the running averages. Their cotangent is then taken as
    already summed over the members (``Reduce.stats_ct``); the modules stop their
    gradient, so none arrives."""
    return _batch_norm_entry(False, x, scale, bias, **kwargs)


def _batch_norm_entry(
    member_stats, x, scale, bias, *, axis=-1, epsilon=1e-5, axis_name=None,
    axis_index_groups=None, mask=None, virtual_batch_size=None, use_fast_variance=True,
):  # fmt: skip
    fn = "batch_norm"
    S.check_float(fn, "x", x)
    cfg = S.make_reduce(fn, x, axis, axis_name, axis_index_groups, member_stats)
    n = cfg.feature_shape(x.shape)
    S.check_vector(fn, "scale", scale, n)
    S.check_vector(fn, "bias", bias, n)
    S.check_epsilon(fn, epsilon)
    fast = S.check_fast_variance(fn, use_fast_variance)
    if virtual_batch_size is not None:  # ghost batches: the op vmapped over sub-batches
        op = functools.partial(
            _batch_norm_entry, member_stats, scale=scale, bias=bias, axis=cfg.axis,
            epsilon=epsilon, axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=fast,
        )  # fmt: skip
        return _ghost.ghost_batches(
            fn, op, x, mask, virtual_batch_size, cfg.axis, axis_name, axis_index_groups
        )
    mask = S.mask_weights(fn, mask, x.shape, cfg)
    S.static_count(fn, x.shape, cfg, mask)
    return _batch_norm(cfg, float(epsilon), fast, x, scale, bias, mask)


def _bn_forward(cfg, epsilon, fast, x, scale, bias, mask):
    cd = S.compute_dtype(x.dtype)
    xf = x.astype(cd)
    mask = S.mask_bool(mask)
    n = S.count(x.shape, mask, cfg, cd)
    s, mean_d, var = S.moments(xf, mask, cfg, n, fast)
    inv = jax.lax.rsqrt(var + epsilon)

    # every position is normalized (as flax does), masked ones too: NaN stays where it was
    def normalize(xf, s, mean_d, inv, scale, bias):
        y = ((xf - s) - mean_d) * inv
        if scale is not None:
            y = y * _vec(scale, cfg, cd)
        if bias is not None:
            y = y + _vec(bias, cfg, cd)
        return y

    y = S.masked_outputs_constant(normalize, mask, mask, xf, s, mean_d, inv, scale, bias)
    stats = cfg.varying(BatchStats(_squeeze(s + mean_d, cfg), _squeeze(var, cfg)), scale, bias)
    return cfg.varying(y.astype(x.dtype)), stats, (s, mean_d, inv, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _batch_norm(cfg, epsilon, fast, x, scale, bias, mask):
    y, stats, _ = _bn_forward(cfg, epsilon, fast, x, scale, bias, mask)
    return y, stats


def _batch_norm_fwd(cfg, epsilon, fast, x, scale, bias, mask):
    y, stats, (s, mean_d, inv, n) = _bn_forward(cfg, epsilon, fast, x, scale, bias, mask)
    # Residuals: x (one input-sized array, in its own dtype) and per-feature vectors.
    return (y, stats), (x, scale, bias, mask, s, mean_d, inv, n)


def _batch_norm_bwd(cfg, epsilon, fast, res, cts):
    # The same rule for both variance algorithms (they are the same function of x); the
    # flag picks how sum(dy * xhat) is accumulated, as it picks the variance's algorithm.
    x, scale, bias, mask, s, mean_d, inv, n = res
    dy, (dmean, dvar) = cts
    cd = inv.dtype
    if epsilon == 0.0:
        # A feature (or ghost sub-batch) with no valid value has var 0, and epsilon 0
        # makes its inv infinite; every one of its positions is masked, so each of its
        # terms is 0: inv is taken as 0 there (else inf * 0 = NaN reached dx and dscale).
        # Its 2 dvar / inv below is then inf, but only inside the masked select.
        inv = jnp.where(n > 0, inv, 0.0)
    mask = S.mask_bool(mask)
    # Masked outputs are constants to differentiation: their cotangent is selected away,
    # and so is x there (garbage such as NaN must not reach a sum: docs/derivations.md).
    dy = S.select(dy.astype(cd), mask)
    d = S.select(x.astype(cd) - s, mask)  # the forward's shifted data (the same expression)
    xhat = (d - mean_d) * inv  # finite where masked (d is 0 there), where dy is 0 and dx selected
    red = cfg.reduce_axes
    # Two reductions of the input-sized arrays, shared by dx and the parameter grads:
    # S1 = sum(dxhat) = scale * sum(dy), S2 = sum(dxhat * xhat) = scale * sum(dy * xhat)
    # (scale is per-feature), so dxhat is never formed (4 reductions -> 2).
    sdy = jnp.sum(dy, axis=red, keepdims=True)
    if fast:
        # Shifted, as the one-pass variance: sum(dy * xhat) = inv * (sum(dy * d) -
        # mean_d * sum(dy)). The reduced product has no per-feature broadcast, so it reads
        # the d that the forward's moments wrote, instead of writing xhat first (XLA:CPU);
        # the round-off grows by the same 1 + |mean - s|/std as the variance's
        # (docs/derivations.md, "Numerics").
        # mean_d and inv are global, so this device's part sums to the global one.
        sdyx = inv * (jnp.sum(dy * d, axis=red, keepdims=True) - mean_d * sdy)
    else:
        sdyx = jnp.sum(dy * xhat, axis=red, keepdims=True)
    # scale inside the psum: it may differ across the members of axis_name (a vmapped or
    # device-varying scale); replicated, psum(scale * v) = scale * psum(v).
    g = None if scale is None else _vec(scale, cfg, cd)
    s1, s2 = cfg.psum((sdy, sdyx) if g is None else (g * sdy, g * sdyx))
    a = inv if g is None else inv * g
    dmean = jnp.reshape(dmean.astype(cd), s1.shape)
    dvar = jnp.reshape(dvar.astype(cd), s1.shape)
    dmean, dvar = cfg.stats_ct((dmean, dvar))  # global cotangents of the statistics
    # dx = inv*(dxhat - (w/n)(S1 + xhat*S2)) + (w/n)(dmean + 2*(x-mean)*dvar); w = mask
    wn = 1.0 / jnp.maximum(n, 1)
    dx = a * dy + S.select(wn * (dmean - inv * s1 + xhat * (2.0 * dvar / inv - inv * s2)), mask)
    dscale = None if scale is None else jnp.reshape(sdyx, scale.shape).astype(scale.dtype)
    dbias = None if bias is None else jnp.reshape(sdy, bias.shape).astype(bias.dtype)
    dscale, dbias = S.param_ct(dscale, scale), S.param_ct(dbias, bias)  # docs/scaling.md
    return dx.astype(x.dtype), dscale, dbias, None


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# ======================================================================== batch_center


def batch_center(
    x,
    bias=None,
    *,
    axis: int = -1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = True,
):
    r"""Batch centering (a mean-only "BN"): :math:`y = x - \mu + b`.

    Backward: :math:`dx = dy - \tfrac1n\sum dy` (only counted rows receive the mean
    term), :math:`db = \sum dy`; the mean output is differentiable
    (:math:`dx \mathrel{+}= d\mu/n`). Keeps nothing input-sized for the backward.

    Args:
      x: floating array ``(..., N)``; float16/bfloat16 accumulate in float32 and ``y``
        keeps ``x``'s dtype.
      bias: ``(N,)`` or None (then 0).
      axis, axis_name, axis_index_groups, mask, virtual_batch_size, use_fast_variance:
        as in :func:`batch_norm`.

    Returns:
      ``(y, BatchStats(mean, None))`` with ``mean`` of shape ``(N,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import batch_center
      >>> y, stats = batch_center(jnp.arange(6.0).reshape(3, 2), jnp.zeros(2))
      >>> y.tolist()
      [[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]]
    """
    return _batch_center_entry(
        True, x, bias, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups,
        mask=mask, virtual_batch_size=virtual_batch_size, use_fast_variance=use_fast_variance,
    )  # fmt: skip


def batch_center_for_running(x, bias=None, **kwargs):
    """:func:`batch_center` for the modules' running averages (as
    :func:`batch_norm_for_running`)."""
    return _batch_center_entry(False, x, bias, **kwargs)


def _batch_center_entry(
    member_stats, x, bias, *, axis=-1, axis_name=None, axis_index_groups=None, mask=None,
    virtual_batch_size=None, use_fast_variance=True,
):  # fmt: skip
    fn = "batch_center"
    S.check_float(fn, "x", x)
    cfg = S.make_reduce(fn, x, axis, axis_name, axis_index_groups, member_stats)
    S.check_vector(fn, "bias", bias, cfg.feature_shape(x.shape))
    # Batch centering computes no variance: either value gives the same one-read mean;
    # the flag is validated so that BatchCenter takes BatchNorm's arguments.
    C.flag(fn, "use_fast_variance", use_fast_variance)
    if virtual_batch_size is not None:  # ghost batches: the op vmapped over sub-batches
        op = functools.partial(
            _batch_center_entry, member_stats, bias=bias, axis=cfg.axis,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
        )  # fmt: skip
        return _ghost.ghost_batches(
            fn, op, x, mask, virtual_batch_size, cfg.axis, axis_name, axis_index_groups
        )
    mask = S.mask_weights(fn, mask, x.shape, cfg)
    S.static_count(fn, x.shape, cfg, mask)
    return _batch_center(cfg, x, bias, mask)


def _bc_forward(cfg, x, bias, mask):
    cd = S.compute_dtype(x.dtype)
    xf = x.astype(cd)
    mask = S.mask_bool(mask)
    n = S.count(x.shape, mask, cfg, cd)
    s = S.shift_of(xf, mask, cfg)
    mean_d = cfg.psum(S.wsum(xf - s, mask, cfg.reduce_axes)) / jnp.maximum(n, 1)
    y = (xf - s) - mean_d
    if bias is not None:
        y = y + _vec(bias, cfg, cd)
    stats = cfg.varying(BatchStats(_squeeze(s + mean_d, cfg), None), bias)
    return cfg.varying(y.astype(x.dtype)), stats, n


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _batch_center(cfg, x, bias, mask):
    y, stats, _ = _bc_forward(cfg, x, bias, mask)
    return y, stats


def _batch_center_fwd(cfg, x, bias, mask):
    y, stats, n = _bc_forward(cfg, x, bias, mask)
    return (y, stats), (jnp.zeros((0,), x.dtype), bias, mask, n)


def _batch_center_bwd(cfg, res, cts):
    x0, bias, mask, n = res
    dy, (dmean, _) = cts
    cd = n.dtype
    mask = S.mask_bool(mask)
    dyf = S.select(dy.astype(cd), mask)  # masked outputs pass no gradient
    s1 = cfg.psum(jnp.sum(dyf, axis=cfg.reduce_axes, keepdims=True))
    dmean = cfg.stats_ct(jnp.reshape(dmean.astype(cd), s1.shape))
    dx = dyf + S.select((dmean - s1) / jnp.maximum(n, 1), mask)
    return dx.astype(x0.dtype), S.param_ct(_grad_vec(dyf, cfg, bias), bias), None


_batch_center.defvjp(_batch_center_fwd, _batch_center_bwd)


# ===================================================================== inference forms


def batch_norm_inference(x, scale, bias, mean, var, *, axis: int = -1, epsilon: float = 1e-5):
    r"""Batch normalization with given (running) statistics: one affine map per feature.

    :math:`y = \gamma (x-\mu_r)/\sqrt{\sigma^2_r+\epsilon} + \beta`
    (docs/derivations.md, "Inference form":
    :math:`y = \frac{\gamma}{\sqrt{Var+\epsilon}}x + (\beta -
    \frac{\gamma E[x]}{\sqrt{Var+\epsilon}})`).

    Backward: :math:`dx = \gamma\,dy/\sqrt{\sigma^2_r+\epsilon}`,
    :math:`d\gamma = \sum dy\,\hat x`, :math:`d\beta = \sum dy`,
    :math:`d\mu_r = -\sum \gamma\,dy/\sqrt{\sigma_r^2+\epsilon}`,
    :math:`d\sigma^2_r = -\tfrac12\sum \gamma\,dy\,\hat x/(\sigma_r^2+\epsilon)`.
    Args:
      x: floating array ``(..., N)``.
      scale, bias: ``(N,)`` or None (then 1 and 0).
      mean, var: ``(N,)``, required: the running statistics.
      axis: the feature axis.
      epsilon: added to ``var``.

    Returns:
      ``y``, ``x``'s shape and dtype.
    """
    fn = "batch_norm_inference"
    S.check_float(fn, "x", x)
    cfg = S.make_reduce(fn, x, axis)
    n = cfg.feature_shape(x.shape)
    S.check_vector(fn, "scale", scale, n)
    S.check_vector(fn, "bias", bias, n)
    S.check_vector(fn, "mean", mean, n)
    S.check_vector(fn, "var", var, n)
    S.check_epsilon(fn, epsilon)
    if mean is None or var is None:
        raise ValueError(f"{fn}: mean and var are required (the running statistics)")
    return _bn_inf(cfg, float(epsilon), x, scale, bias, mean, var)


def _bn_inf_parts(cfg, epsilon, x, mean, var):
    cd = S.compute_dtype(jnp.result_type(x.dtype, mean.dtype, var.dtype))
    inv = jax.lax.rsqrt(_vec(var, cfg, cd) + epsilon)
    xhat = (x.astype(cd) - _vec(mean, cfg, cd)) * inv
    return cd, inv, xhat


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bn_inf(cfg, epsilon, x, scale, bias, mean, var):
    cd, inv, xhat = _bn_inf_parts(cfg, epsilon, x, mean, var)
    y = xhat if scale is None else xhat * _vec(scale, cfg, cd)
    if bias is not None:
        y = y + _vec(bias, cfg, cd)
    return y.astype(x.dtype)


def _bn_inf_fwd(cfg, epsilon, x, scale, bias, mean, var):
    # the undecorated function (.fun): a custom_vjp inside the fwd rule would stop
    # forward-over-reverse (jax.hessian, jacfwd of grad)
    return _bn_inf.fun(cfg, epsilon, x, scale, bias, mean, var), (x, scale, bias, mean, var)


def _bn_inf_bwd(cfg, epsilon, res, dy):
    x, scale, bias, mean, var = res
    cd, inv, xhat = _bn_inf_parts(cfg, epsilon, x, mean, var)
    dy = dy.astype(cd)
    dxhat = dy if scale is None else dy * _vec(scale, cfg, cd)
    dx = dxhat * inv
    dmean = -jnp.sum(dx, axis=cfg.reduce_axes).astype(mean.dtype)
    # inv has the kept dims of x; reshaped (not squeezed: a feature axis of size 1 must
    # stay) to the reduced sum's feature shape
    inv_f = jnp.reshape(inv, cfg.feature_shape(x.shape))
    dvar = (-0.5 * jnp.sum(dxhat * xhat, axis=cfg.reduce_axes) * inv_f**2).astype(var.dtype)
    dvar = jnp.reshape(dvar, var.shape)
    dmean = jnp.reshape(dmean, mean.shape)
    # each per-feature cotangent typed as its primal (summed over the devices, or given
    # its sharding, where that differs: docs/scaling.md)
    return (
        dx.astype(x.dtype),
        S.param_ct(_grad_vec(dy * xhat, cfg, scale), scale),
        S.param_ct(_grad_vec(dy, cfg, bias), bias),
        S.param_ct(dmean, mean),
        S.param_ct(dvar, var),
    )


_bn_inf.defvjp(_bn_inf_fwd, _bn_inf_bwd)


def batch_center_inference(x, bias, mean, *, axis: int = -1):
    r"""Batch centering with a given (running) mean: :math:`y = x - \mu_r + b`.

    Backward: :math:`dx = dy`, :math:`db = \sum dy`, :math:`d\mu_r = -\sum dy`.

    Args:
      x: floating array ``(..., N)``.
      bias: ``(N,)`` or None (then 0).
      mean: ``(N,)``, required: the running mean.
      axis: the feature axis.

    Returns:
      ``y``, ``x``'s shape and dtype.
    """
    fn = "batch_center_inference"
    S.check_float(fn, "x", x)
    cfg = S.make_reduce(fn, x, axis)
    n = cfg.feature_shape(x.shape)
    S.check_vector(fn, "bias", bias, n)
    if mean is None:
        raise ValueError(f"{fn}: mean is required (the running mean)")
    S.check_vector(fn, "mean", mean, n)
    return _bc_inf(cfg, x, bias, mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bc_inf(cfg, x, bias, mean):
    cd = S.compute_dtype(jnp.result_type(x.dtype, mean.dtype))
    y = x.astype(cd) - _vec(mean, cfg, cd)
    if bias is not None:
        y = y + _vec(bias, cfg, cd)
    return y.astype(x.dtype)


def _bc_inf_fwd(cfg, x, bias, mean):
    return _bc_inf.fun(cfg, x, bias, mean), (jnp.zeros((0,), x.dtype), bias, mean)


def _bc_inf_bwd(cfg, res, dy):
    x0, bias, mean = res
    cd = S.compute_dtype(jnp.result_type(dy.dtype, mean.dtype))
    dyf = dy.astype(cd)
    s = jnp.sum(dyf, axis=cfg.reduce_axes)
    return (
        dy.astype(x0.dtype),
        None if bias is None else S.param_ct(s.astype(bias.dtype), bias),
        S.param_ct((-s).astype(mean.dtype), mean),
    )


_bc_inf.defvjp(_bc_inf_fwd, _bc_inf_bwd)
