"""Naive forward passes of every op in plain ``jax.numpy``, with no custom rule.

These are the ground truth: ``jax.vjp`` of a function here is what each hand-derived
rule in :mod:`jax_batchinhib.ops` is proved against (:func:`jax_batchinhib.testing.check_vjp`).
They share no code with the ops on purpose: the formulas are written out as the
derivation states them, one line per equation, in at least float32. They are also
what a module uses with ``use_autodiff=True`` (pure forward mode, ``jax.jvp`` or
``jax.jacfwd`` of the op, works through these and not through a ``custom_vjp``;
``jax.hessian``, forward over reverse, works through both).

Same signatures and return values as the ops (``virtual_batch_size`` included: the
reference is ``jax.vmap``-ed over the ghost batches); the references do not validate
their arguments.

Args and Returns of every function here: those of the op of the same name in
:mod:`jax_batchinhib.ops` (see its docstring).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops._stats import explicit_spec, named, row_sum_kw
from jax_batchinhib.ops.batch_inhib import InhibOptions, InhibStats, relative_guard_floor
from jax_batchinhib.ops.batch_norm import BatchStats
from jax_batchinhib.ops.whitening import WhiteningStats

#: Full-precision matmuls: on GPUs the default float32 matmul may run in TF32 (10-bit
#: mantissa), which would make the ground truth itself wrong at 1e-3.
_HIGHEST = lax.Precision.HIGHEST


def _f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _axes(x, axis):
    """The feature axes (a sorted tuple: ``axis`` may be an int or a tuple) and the rest."""
    axes = tuple(sorted(a % x.ndim for a in (axis if isinstance(axis, tuple | list) else (axis,))))
    return axes, tuple(a for a in range(x.ndim) if a not in axes)


def _bshape(x, axes):
    return tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))


def _feat(x, axes):
    return tuple(x.shape[a] for a in axes)


def _psum(v, axis_name, axis_index_groups=None):
    return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=axis_index_groups)


def _mask(x, mask, axis):
    """The mask as booleans of x's shape (None without one), read as the ops read it: a
    mask of x's shape without the feature ``axis`` is a row mask, any other broadcasts
    to x (a feature mask of shape (N,), say)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    rows = tuple(s for a, s in enumerate(x.shape) if a not in axis)
    if x.ndim > 1 and mask.shape == rows:
        mask = jnp.expand_dims(mask, axis)
    mask = jnp.broadcast_to(mask != 0, x.shape)
    spec = explicit_spec(x)
    if spec is not None and explicit_spec(mask) != spec:  # selects need x's sharding
        mask = jax.sharding.reshard(mask, named(x, *spec))
    return mask


def _where(mask, v, fill=0.0):
    """Masked positions SELECTED away (never multiplied by 0: NaN * 0 is NaN)."""
    return v if mask is None else jnp.where(mask, v, fill)


def _shift(xf, mask, axis, red, axis_name, axis_index_groups):
    """The shift: the first (valid) sample of each feature, averaged over devices."""
    spec = explicit_spec(xf)  # an Explicit mesh: a gather with a stated output sharding
    if mask is None:
        s = xf
        for a in red:  # one axis at a time: a slice, or a gather where it is sharded
            if spec is None or spec[a] is None:
                s = lax.slice_in_dim(s, 0, 1, axis=a)
            else:
                spec = tuple(None if b == a else spec[b] for b in range(s.ndim))
                at = tuple(
                    jnp.zeros(1, jnp.int32) if b == a else slice(None) for b in range(s.ndim)
                )
                s = s.at[at].get(out_sharding=named(s, *spec))
        k = jnp.ones_like(s)
    else:
        nf = math.prod(_feat(xf, axis))
        mt = jnp.transpose(mask, red + axis).reshape(-1, nf)
        xt = jnp.transpose(xf, red + axis).reshape(-1, nf)
        i = jnp.argmax(mt, axis=0)
        k = jnp.any(mt, axis=0).astype(xf.dtype)
        at = (i, jnp.arange(nf))
        first = xt[at] if spec is None else xt.at[at].get(out_sharding=named(xt))
        s = jnp.where(k > 0, first, 0.0)
        s, k = s.reshape(_bshape(xf, axis)), k.reshape(_bshape(xf, axis))
    s = _psum(s * k, axis_name, axis_index_groups) / jnp.maximum(
        _psum(k, axis_name, axis_index_groups), 1
    )
    return lax.stop_gradient(s)


def _moments(xv, mask, axis, red, n, fast, axis_name, axis_index_groups):
    """The shift ``s``, the mean of ``d = x - s`` and the biased variance of the valid
    values (xv: x with masked values already selected away): one pass (Σd, Σd²) with
    ``fast``, else two passes. The mean is ``s + mean_d``; centre as
    ``(x - s) - mean_d``, as the ops do: ``x - (s + mean_d)`` rounds the mean to x's
    scale first and loses the shift's accuracy."""
    s = _shift(xv, mask, axis, red, axis_name, axis_index_groups)
    d = _where(mask, xv - s)
    mean_d = _psum(jnp.sum(d, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    if fast:
        ss = _psum(jnp.sum(d * d, axis=red, keepdims=True), axis_name, axis_index_groups) / n
        var = jnp.maximum(ss - mean_d**2, 0.0)
    else:
        dc = _where(mask, d - mean_d)
        var = _psum(jnp.sum(dc**2, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    return s, mean_d, var


def _count(x, mask, red, cd, axis_name, axis_index_groups):
    w = jnp.ones(x.shape, cd) if mask is None else mask.astype(cd)
    n = _psum(jnp.sum(w, axis=red, keepdims=True), axis_name, axis_index_groups)
    return jnp.maximum(n, 1)


def _masked_output(mask, y_valid, y_all):
    """y at valid positions from the selected data; at masked positions the same formula
    on the raw data, as a constant (masked outputs pass no gradient)."""
    return y_valid if mask is None else jnp.where(mask, y_valid, lax.stop_gradient(y_all))


def _ghost_batches(op, x, mask, v, axis, axis_name, axis_index_groups):
    """Ghost batches in plain JAX: ``op(xs, mask)`` on each run of ``v`` rows of the
    leading axis (``jax.vmap`` over the sub-batches), the statistics averaged over the
    sub-batches that hold a valid value (on any device; per feature for a feature-sized
    statistic)."""
    b = x.shape[0]
    xg = x.reshape((b // v, v) + tuple(x.shape[1:]))
    if mask is None:
        y, stats = jax.vmap(lambda xs: op(xs, None))(xg)
        return y.reshape(x.shape), jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)
    mask = jnp.asarray(mask)
    mask = jnp.broadcast_to(mask, (b,) + tuple(mask.shape[1:]))
    mg = mask.reshape((b // v, v) + tuple(mask.shape[1:]))
    y, stats = jax.vmap(op)(xg, mg)
    axes, red = _axes(x, axis)

    def valid_of(xs, ms):
        n = jnp.sum(_mask(xs, ms, axes).astype(jnp.int32), axis=red)
        return _psum(n, axis_name, axis_index_groups).reshape(-1) > 0

    valid = jax.vmap(valid_of)(xg, mg)  # (sub-batches, features)

    def average(s):
        if math.prod(s.shape[1:]) == valid.shape[1]:
            w = valid.reshape(s.shape)
        else:  # a covariance or whitening matrix: row masks, any valid row counts
            w = jnp.any(valid, axis=1).reshape((-1,) + (1,) * (s.ndim - 1))
        return jnp.sum(jnp.where(w, s, 0.0), axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1)

    return y.reshape(x.shape), jax.tree.map(average, stats)


def batch_norm(
    x,
    scale=None,
    bias=None,
    *,
    axis=-1,
    epsilon=1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    virtual_batch_size=None,
    use_fast_variance=True,
):
    """Reference batch norm: shifted mean, biased variance, normalize, scale and shift."""
    if virtual_batch_size is not None:

        def op(xs, ms):
            return batch_norm(
                xs, scale, bias, axis=axis, epsilon=epsilon, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms, use_fast_variance=use_fast_variance,
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size, axis, axis_name, axis_index_groups)
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    m = _mask(x, mask, axis)
    xv = _where(m, xf)
    n = _count(x, m, red, cd, axis_name, axis_index_groups)
    s, mean_d, var = _moments(xv, m, axis, red, n, use_fast_variance, axis_name, axis_index_groups)
    mean = s + mean_d

    def normalize(z):
        y = ((z - s) - mean_d) / jnp.sqrt(var + epsilon)
        if scale is not None:
            y = y * scale.astype(cd).reshape(_bshape(x, axis))
        if bias is not None:
            y = y + bias.astype(cd).reshape(_bshape(x, axis))
        return y

    y = _masked_output(m, normalize(xv), normalize(xf))
    return y.astype(x.dtype), BatchStats(mean.reshape(_feat(x, axis)), var.reshape(_feat(x, axis)))


def batch_center(
    x,
    bias=None,
    *,
    axis=-1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    virtual_batch_size=None,
    use_fast_variance=True,
):
    """Reference batch centering: y = x - mean + bias."""
    if virtual_batch_size is not None:

        def op(xs, ms):
            return batch_center(
                xs, bias, axis=axis, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms, use_fast_variance=use_fast_variance,
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size, axis, axis_name, axis_index_groups)
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    m = _mask(x, mask, axis)
    xv = _where(m, xf)
    n = _count(x, m, red, cd, axis_name, axis_index_groups)
    s = _shift(xv, m, axis, red, axis_name, axis_index_groups)
    d_sum = jnp.sum(_where(m, xv - s), axis=red, keepdims=True)
    mean_d = _psum(d_sum, axis_name, axis_index_groups) / n
    mean = s + mean_d

    def center(z):
        y = (z - s) - mean_d  # as batch_norm: the shift first
        return y if bias is None else y + bias.astype(cd).reshape(_bshape(x, axis))

    y = _masked_output(m, center(xv), center(xf))
    return y.astype(x.dtype), BatchStats(mean.reshape(_feat(x, axis)), None)


def batch_norm_inference(x, scale, bias, mean, var, *, axis=-1, epsilon=1e-5):
    """Reference batch norm with given statistics."""
    cd = _f32(x.dtype)
    axis, _ = _axes(x, axis)
    b = _bshape(x, axis)
    y = (x.astype(cd) - mean.astype(cd).reshape(b)) / jnp.sqrt(var.astype(cd).reshape(b) + epsilon)
    if scale is not None:
        y = y * scale.astype(cd).reshape(b)
    if bias is not None:
        y = y + bias.astype(cd).reshape(b)
    return y.astype(x.dtype)


def batch_center_inference(x, bias, mean, *, axis=-1):
    """Reference batch centering with a given mean."""
    cd = _f32(x.dtype)
    axis, _ = _axes(x, axis)
    b = _bshape(x, axis)
    y = x.astype(cd) - mean.astype(cd).reshape(b)
    if bias is not None:
        y = y + bias.astype(cd).reshape(b)
    return y.astype(x.dtype)


def _inhibition(cov, alpha, opts: InhibOptions):
    """R from a covariance (G, n, n): R (G, n, n) (docs/derivations.md, "3. batch_inhib")."""
    rho, epsilon, guard = opts.rho, opts.epsilon, opts.guard
    correlation, denominator, guard_mode = opts.correlation, opts.denominator, opts.guard_mode
    n = cov.shape[-1]
    var = jnp.diagonal(cov, axis1=-2, axis2=-1)
    sigma = jnp.sqrt(var + epsilon) if correlation == "pearson" else var + epsilon  # (1.2)
    r = cov / (sigma[..., :, None] * sigma[..., None, :])  # (1.3)
    g = jax.nn.softplus(rho * alpha) / rho
    g = g * (1 - jnp.eye(n, dtype=g.dtype))  # l != i (in g's dtype, also under x64)
    num = g * r
    den = jnp.sum(g * (r if denominator == "signed" else jnp.abs(r)), axis=-1, keepdims=True)
    if guard_mode == "absolute":
        return num * den / (den**2 + guard**2)  # (1.4), guarded 1/den
    a = jnp.sum(g * jnp.abs(r), axis=-1, keepdims=True)
    tau = relative_guard_floor(a.dtype)
    return num * den / (den**2 + guard**2 * (a**2 + tau**2))  # scale-free guard


def batch_inhib(
    x,
    alpha,
    *,
    rho=1.0,
    epsilon=1e-5,
    axis=-1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    groups=1,
    correlation="pearson",
    denominator="signed",
    guard=None,
    guard_mode="absolute",
    virtual_batch_size=None,
    use_fast_variance=False,
):
    """Reference BatchInhib (docs/derivations.md, "3. batch_inhib"), statistics stop-gradient."""
    opts = InhibOptions(rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    if virtual_batch_size is not None:

        def op(xs, ms):
            return batch_inhib(
                xs, alpha, axis=axis, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms,
                use_fast_variance=use_fast_variance, **opts.kwargs(),
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size, axis, axis_name, axis_index_groups)
    cd = _f32(x.dtype)
    axes, _ = _axes(x, axis)
    last = tuple(range(x.ndim - len(axes), x.ndim))
    xt = jnp.moveaxis(x, axes, last)  # feature axes last, flattened into N features
    N = math.prod(_feat(x, axes))
    X = xt.reshape(-1, N).astype(cd)
    if mask is None:
        w = None
    else:
        mk = jnp.asarray(mask)
        if mk.ndim == x.ndim:
            mm = jnp.moveaxis(mk, axes, last)  # feature dims of 1 (a row mask)
            mk = mm.reshape(mm.shape[: x.ndim - len(axes)] + (-1,))[..., 0]
        w = jnp.broadcast_to(mk != 0, xt.shape[: x.ndim - len(axes)]).reshape(-1, 1)
    wN = None if w is None else jnp.broadcast_to(w, X.shape)
    Xv = _where(w, X)  # masked rows selected away
    n = _count(X, wN, (0,), cd, axis_name, axis_index_groups).reshape(-1)[0]  # rows masked whole
    s = _shift(Xv, wN, (1,), (0,), axis_name, axis_index_groups)
    D = _where(w, Xv - s)
    mu_d = _psum(jnp.sum(D, axis=0), axis_name, axis_index_groups) / n
    mu = s[0] + mu_d  # (1.1)
    G, k = groups, N // groups
    if use_fast_variance:  # cov = Σ d dᵀ / n - mean_d mean_dᵀ, d = x - shift
        Dg = D.reshape(-1, G, k)
        sdd = jnp.einsum("mgi,mgk->gik", Dg, Dg, precision=_HIGHEST, **row_sum_kw(Dg, 0))
        md = mu_d.reshape(G, k)
        cov = _psum(sdd, axis_name, axis_index_groups) / n - md[:, :, None] * md[:, None, :]
        dia = jnp.diagonal(cov, axis1=-2, axis2=-1)
        cov = cov + (jnp.maximum(dia, 0) - dia)[..., None] * jnp.eye(k, dtype=cd)
    else:
        Xc = _where(w, D - mu_d).reshape(-1, G, k)
        cov = (
            _psum(
                jnp.einsum("mgi,mgk->gik", Xc, Xc, precision=_HIGHEST, **row_sum_kw(Xc, 0)),
                axis_name,
                axis_index_groups,
            )
            / n
        )
    a3 = alpha[None] if groups == 1 else alpha
    R = _inhibition(cov, a3.astype(cd), opts)

    def inhibit(Z):
        Zg = Z.reshape(Z.shape[0], G, k)
        return (Zg - jnp.einsum("mgl,gil->mgi", Zg, R, precision=_HIGHEST)).reshape(Z.shape)

    Y = _masked_output(w, inhibit(Xv), inhibit(X))  # (1.5)
    y = jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), last, axes)
    var = jnp.diagonal(cov, axis1=-2, axis2=-1).reshape(-1)
    stats = InhibStats(mu, var, cov)
    return y, jax.tree.map(lax.stop_gradient, stats)


def batch_inhib_inference(
    x,
    alpha,
    cov,
    *,
    rho=1.0,
    epsilon=1e-5,
    axis=-1,
    groups=1,
    correlation="pearson",
    denominator="signed",
    guard=None,
    guard_mode="absolute",
):
    """Reference BatchInhib with a given covariance: y = x (I - R^T)."""
    opts = InhibOptions(rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    cd = _f32(jnp.result_type(x.dtype, cov.dtype))
    axes, _ = _axes(x, axis)
    last = tuple(range(x.ndim - len(axes), x.ndim))
    xt = jnp.moveaxis(x, axes, last)
    N = math.prod(_feat(x, axes))
    Xg = xt.reshape(-1, groups, N // groups).astype(cd)
    n = N // groups  # alpha and cov: (n, n) for one group, or (groups, n, n)
    a3 = jnp.reshape(alpha, (groups, n, n))
    c3 = jnp.reshape(cov, (groups, n, n))
    R = _inhibition(c3.astype(cd), a3.astype(cd), opts)
    Y = Xg - jnp.einsum("mgl,gil->mgi", Xg, R, precision=_HIGHEST)
    return jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), last, axes)


def dropout(x, rate, key, *, residual="bits", broadcast_dims=()):
    """Reference inverted dropout: the same mask as the op for the same key, drawn as
    flax.linen.Dropout draws it (shape of x with 1 on ``broadcast_dims``, broadcast).
    ``residual`` is the op's choice of what its backward keeps; autodiff ignores it."""
    del residual
    if rate == 0:
        return x
    if rate == 1:
        return jnp.zeros_like(x)
    shape = [int(s) for s in x.shape]
    for d in broadcast_dims:
        shape[d] = 1
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    # as flax: divided in x's dtype by 1 - rate rounded to it
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def softmax(x, axis=-1):
    """Reference softmax: exp(x - max) / sum."""
    xf = x.astype(_f32(x.dtype))
    e = jnp.exp(xf - lax.stop_gradient(jnp.max(xf, axis=axis, keepdims=True)))
    return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _log_softmax(z, axis):
    m = lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    return z - m - jnp.log(jnp.sum(jnp.exp(z - m), axis=axis, keepdims=True))


def softmax_cross_entropy(logits, labels, axis=-1):
    """Reference cross-entropy: -sum(labels * log_softmax(logits)).

    Naive on purpose, as optax.softmax_cross_entropy: a masked class (logit -inf, label 0)
    gives 0 * inf = NaN here, where the op takes 0 log 0 = 0.
    """
    cd = _f32(jnp.result_type(logits.dtype, labels.dtype))
    logp = _log_softmax(logits.astype(cd), axis)
    return (-jnp.sum(labels.astype(cd) * logp, axis=axis)).astype(logits.dtype)


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1):
    """Reference cross-entropy with class indices: log-sum-exp(logits) minus the logit at
    the label (-log_softmax there), as optax's. An out-of-range label reads NaN (the
    gather's fill) and adds nothing to the gradient, which is then ``g softmax(z)``."""
    z = logits.astype(_f32(logits.dtype))
    m = lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    lse = jnp.squeeze(m, axis) + jnp.log(jnp.sum(jnp.exp(z - m), axis=axis))
    idx = jnp.expand_dims(labels, axis)
    z_y = jnp.squeeze(jnp.take_along_axis(z, idx, axis=axis, mode="fill"), axis)
    return (lse - z_y).astype(logits.dtype)


def _whiten(whitening, x, scale, bias, groups, epsilon, axis, axis_name, axis_index_groups, mask):
    """Shared forward of the whitening references: centre, covariance, W, x̂ = X_c W."""
    cd = _f32(x.dtype)
    axis = axis % x.ndim
    xt = jnp.moveaxis(x, axis, -1)
    N = xt.shape[-1]
    k = N // groups
    X = xt.reshape(-1, N).astype(cd)
    if mask is None:
        w = jnp.ones((X.shape[0], 1), cd)
    else:
        mk = jnp.asarray(mask)
        if mk.ndim == x.ndim:
            mk = jnp.squeeze(jnp.moveaxis(mk, axis, -1), -1)
        w = jnp.broadcast_to(mk, xt.shape[:-1]).reshape(-1, 1).astype(cd)
    # masked rows selected away (never weighted: NaN * 0 is NaN); their outputs are the
    # same formula on the raw rows, as constants to differentiation (docs/derivations.md,
    # "Masks select")
    sel = None if mask is None else w > 0
    # at least 1: no valid row gives statistics 0, as the ops (not 0/0)
    n = jnp.maximum(_psum(jnp.sum(w), axis_name, axis_index_groups), 1)
    # shifted by the first valid row, as the ops: (x - s) - mean_d keeps float32 accuracy
    # where |mean| >> std
    Xs = _where(sel, X)
    s = _shift(Xs, None if sel is None else jnp.broadcast_to(sel, X.shape), (1,), (0,),
               axis_name, axis_index_groups)  # fmt: skip
    mean_d = _psum(jnp.sum(_where(sel, Xs - s), axis=0), axis_name, axis_index_groups) / n
    mu = s[0] + mean_d
    Xc = ((X - s) - mean_d).reshape(X.shape[0], groups, k)
    Xv = Xc if sel is None else _where(sel[:, :, None], Xc)
    cov = (
        _psum(
            jnp.einsum("mgi,mgk->gik", Xv, Xv, precision=_HIGHEST, **row_sum_kw(Xv, 0)),
            axis_name,
            axis_index_groups,
        )
        / n
    )
    W = whitening(cov + epsilon * jnp.eye(k, dtype=cd))

    def out(Xc):
        Y = jnp.einsum("mgi,gik->mgk", Xc, W, precision=_HIGHEST).reshape(X.shape)
        if scale is not None:
            Y = Y * scale.astype(cd)
        if bias is not None:
            Y = Y + bias.astype(cd)
        return Y

    Y = _masked_output(sel, out(Xv), out(Xc))
    y = jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), -1, axis)
    return y, jax.tree.map(lax.stop_gradient, WhiteningStats(mu, cov, W))


def _newton_schulz(sigma, iterations):
    """IterNorm (Huang et al. 2019, Algorithm 1): W = P_T / sqrt(tr Σ)."""
    tr = jnp.trace(sigma, axis1=-2, axis2=-1)[:, None, None]
    sn = sigma / tr
    P = jnp.broadcast_to(jnp.eye(sigma.shape[-1], dtype=sigma.dtype), sigma.shape)
    for _ in range(iterations):
        P = 1.5 * P - 0.5 * jnp.matmul(
            jnp.matmul(jnp.matmul(P, P, precision=_HIGHEST), P, precision=_HIGHEST),
            sn,
            precision=_HIGHEST,
        )
    return P / jnp.sqrt(tr)


def _zca(sigma):
    """ZCA (Huang et al. 2018): W = U diag(λ^{-1/2}) Uᵀ from jnp.linalg.eigh.

    Σ is divided by its mean eigenvalue t = tr Σ / n before ``eigh`` and W by √t after
    (the same W up to round-off): JAX's derivative of ``eigh`` (jax 0.10) forms
    ``(1 + λ_j) - λ_i``, which is 0 on the diagonal once λ reaches 2**24 in float32
    (features of std ~4e3), and made the reference's gradient NaN there."""
    t = jnp.trace(sigma, axis1=-2, axis2=-1)[:, None, None] / sigma.shape[-1]
    lam, U = jnp.linalg.eigh(sigma / t)
    w = jnp.matmul(U * lam[:, None, :] ** -0.5, jnp.swapaxes(U, -1, -2), precision=_HIGHEST)
    return w / jnp.sqrt(t)


def iter_norm(
    x,
    scale=None,
    bias=None,
    *,
    groups=1,
    iterations=5,
    epsilon=1e-5,
    axis=-1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
):
    """Reference IterNorm: T Newton-Schulz steps towards Σ^{-1/2}; statistics stop-gradient."""
    return _whiten(
        lambda s: _newton_schulz(s, iterations),
        x, scale, bias, groups, epsilon, axis, axis_name, axis_index_groups, mask,
    )  # fmt: skip


def zca_norm(
    x,
    scale=None,
    bias=None,
    *,
    groups=1,
    epsilon=1e-5,
    axis=-1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
):
    """Reference ZCA whitening by eigendecomposition; statistics stop-gradient."""
    return _whiten(_zca, x, scale, bias, groups, epsilon, axis, axis_name, axis_index_groups, mask)


def iter_norm_inference(x, scale, bias, mean, whitening_matrix, *, groups=1, axis=-1):
    """Reference whitening with a given mean and W: y = scale (x - mean) W + bias."""
    cd = _f32(jnp.result_type(x.dtype, mean.dtype, whitening_matrix.dtype))
    axis = axis % x.ndim
    xt = jnp.moveaxis(x, axis, -1)
    N = xt.shape[-1]
    Xc = (xt.reshape(-1, N).astype(cd) - mean.astype(cd)).reshape(-1, groups, N // groups)
    W = whitening_matrix.astype(cd).reshape(groups, N // groups, N // groups)
    Y = jnp.einsum("mgi,gik->mgk", Xc, W, precision=_HIGHEST).reshape(-1, N)
    if scale is not None:
        Y = Y * scale.astype(cd)
    if bias is not None:
        Y = Y + bias.astype(cd)
    return jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), -1, axis)


def zca_norm_inference(x, scale, bias, mean, whitening_matrix, *, groups=1, axis=-1):
    """Reference ZCA with a given mean and W (the same map as iter_norm_inference)."""
    return iter_norm_inference(x, scale, bias, mean, whitening_matrix, groups=groups, axis=axis)
