"""Naive forward passes of every op in plain ``jax.numpy``, with no custom rule.

These are the ground truth: ``jax.vjp`` of a function here is what each hand-derived
rule in :mod:`jax_batchinhib.ops` is proved against (:func:`jax_batchinhib.testing.check_vjp`).
They share no code with the ops on purpose: the formulas are written out as the
derivation states them, one line per equation, in at least float32. They are also
what a module uses with ``use_autodiff=True`` (forward-mode autodiff, ``jax.jvp``,
``jax.hessian``, works through these and not through a ``custom_vjp``).

Same signatures and return values as the ops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops.batch_inhib import GUARD_DEFAULTS, RELATIVE_GUARD_FLOOR, InhibStats
from jax_batchinhib.ops.batch_norm import BatchStats

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
    """The mask as booleans of x's shape (None without one)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim == x.ndim - len(axis) and x.ndim > 1:
        mask = jnp.expand_dims(mask, axis)
    return jnp.broadcast_to(mask != 0, x.shape)


def _where(mask, v, fill=0.0):
    """Masked positions SELECTED away (never multiplied by 0: NaN * 0 is NaN)."""
    return v if mask is None else jnp.where(mask, v, fill)


def _shift(xf, mask, axis, red, axis_name, axis_index_groups):
    """The shift: the first (valid) sample of each feature, averaged over devices."""
    if mask is None:
        s = xf[tuple(slice(0, 1) if a in red else slice(None) for a in range(xf.ndim))]
        k = jnp.ones_like(s)
    else:
        nf = math.prod(_feat(xf, axis))
        mt = jnp.transpose(mask, red + axis).reshape(-1, nf)
        xt = jnp.transpose(xf, red + axis).reshape(-1, nf)
        i = jnp.argmax(mt, axis=0)
        k = jnp.any(mt, axis=0).astype(xf.dtype)
        s = jnp.where(k > 0, xt[i, jnp.arange(nf)], 0.0)
        s, k = s.reshape(_bshape(xf, axis)), k.reshape(_bshape(xf, axis))
    s = _psum(s * k, axis_name, axis_index_groups) / jnp.maximum(
        _psum(k, axis_name, axis_index_groups), 1
    )
    return lax.stop_gradient(s)


def _moments(xv, mask, axis, red, n, fast, axis_name, axis_index_groups):
    """Shifted mean and biased variance of the valid values (xv: x with masked values
    already selected away): one pass (Σd, Σd²) with ``fast``, else two passes."""
    s = _shift(xv, mask, axis, red, axis_name, axis_index_groups)
    d = _where(mask, xv - s)
    mean_d = _psum(jnp.sum(d, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    if fast:
        ss = _psum(jnp.sum(d * d, axis=red, keepdims=True), axis_name, axis_index_groups) / n
        var = jnp.maximum(ss - mean_d**2, 0.0)
    else:
        dc = _where(mask, d - mean_d)
        var = _psum(jnp.sum(dc**2, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    return s + mean_d, var


def _count(x, mask, red, cd, axis_name, axis_index_groups):
    w = jnp.ones(x.shape, cd) if mask is None else mask.astype(cd)
    n = _psum(jnp.sum(w, axis=red, keepdims=True), axis_name, axis_index_groups)
    return jnp.maximum(n, 1)


def _masked_output(mask, y_valid, y_all):
    """y at valid positions from the selected data; at masked positions the same formula
    on the raw data, as a constant (masked outputs pass no gradient)."""
    return y_valid if mask is None else jnp.where(mask, y_valid, lax.stop_gradient(y_all))


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
    use_fast_variance=True,
):
    """Reference batch norm: shifted mean, biased variance, normalize, scale and shift."""
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    m = _mask(x, mask, axis)
    xv = _where(m, xf)
    n = _count(x, m, red, cd, axis_name, axis_index_groups)
    mean, var = _moments(xv, m, axis, red, n, use_fast_variance, axis_name, axis_index_groups)

    def normalize(z):
        y = (z - mean) / jnp.sqrt(var + epsilon)
        if scale is not None:
            y = y * scale.astype(cd).reshape(_bshape(x, axis))
        if bias is not None:
            y = y + bias.astype(cd).reshape(_bshape(x, axis))
        return y

    y = _masked_output(m, normalize(xv), normalize(xf))
    return y.astype(x.dtype), BatchStats(mean.reshape(_feat(x, axis)), var.reshape(_feat(x, axis)))


def batch_center(x, bias=None, *, axis=-1, axis_name=None, axis_index_groups=None, mask=None):
    """Reference batch centering: y = x - mean + bias."""
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    m = _mask(x, mask, axis)
    xv = _where(m, xf)
    n = _count(x, m, red, cd, axis_name, axis_index_groups)
    s = _shift(xv, m, axis, red, axis_name, axis_index_groups)
    mean = (
        s
        + _psum(jnp.sum(_where(m, xv - s), axis=red, keepdims=True), axis_name, axis_index_groups)
        / n
    )

    def center(z):
        y = z - mean
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


def _inhibition(cov, alpha, rho, epsilon, correlation, denominator, guard, guard_mode="absolute"):
    """Seed 000 eqs 1.2-1.4 from a covariance (G, n, n): R (G, n, n)."""
    guard = GUARD_DEFAULTS[guard_mode] if guard is None else guard
    n = cov.shape[-1]
    var = jnp.diagonal(cov, axis1=-2, axis2=-1)
    sigma = jnp.sqrt(var + epsilon) if correlation == "pearson" else var + epsilon  # (1.2)
    r = cov / (sigma[..., :, None] * sigma[..., None, :])  # (1.3)
    g = jax.nn.softplus(rho * alpha) / rho
    g = g * (1 - jnp.eye(n))  # l != i
    num = g * r
    den = jnp.sum(g * (r if denominator == "signed" else jnp.abs(r)), axis=-1, keepdims=True)
    if guard_mode == "absolute":
        return num * den / (den**2 + guard**2)  # (1.4), guarded 1/den
    a = jnp.sum(g * jnp.abs(r), axis=-1, keepdims=True)
    return num * den / (den**2 + guard**2 * (a**2 + RELATIVE_GUARD_FLOOR**2))  # scale-free guard


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
    use_fast_variance=True,
):
    """Reference BatchInhib (seed 000 eqs 1.1-1.5), statistics stop-gradient."""
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
        sdd = jnp.einsum("mgi,mgk->gik", Dg, Dg, precision=_HIGHEST)
        md = mu_d.reshape(G, k)
        cov = _psum(sdd, axis_name, axis_index_groups) / n - md[:, :, None] * md[:, None, :]
        dia = jnp.diagonal(cov, axis1=-2, axis2=-1)
        cov = cov + (jnp.maximum(dia, 0) - dia)[..., None] * jnp.eye(k, dtype=cd)
    else:
        Xc = _where(w, D - mu_d).reshape(-1, G, k)
        cov = (
            _psum(
                jnp.einsum("mgi,mgk->gik", Xc, Xc, precision=_HIGHEST),
                axis_name,
                axis_index_groups,
            )
            / n
        )
    a3 = alpha[None] if groups == 1 else alpha
    R = _inhibition(cov, a3.astype(cd), rho, epsilon, correlation, denominator, guard, guard_mode)

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
    cd = _f32(jnp.result_type(x.dtype, cov.dtype))
    axes, _ = _axes(x, axis)
    last = tuple(range(x.ndim - len(axes), x.ndim))
    xt = jnp.moveaxis(x, axes, last)
    N = math.prod(_feat(x, axes))
    Xg = xt.reshape(-1, groups, N // groups).astype(cd)
    a3 = alpha[None] if groups == 1 else alpha
    c3 = cov[None] if groups == 1 else cov
    R = _inhibition(
        c3.astype(cd), a3.astype(cd), rho, epsilon, correlation, denominator, guard, guard_mode
    )
    Y = Xg - jnp.einsum("mgl,gil->mgi", Xg, R, precision=_HIGHEST)
    return jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), last, axes)


def dropout(x, rate, key):
    """Reference inverted dropout: the same mask as the op for the same key."""
    if rate == 0:
        return x
    if rate == 1:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x.astype(_f32(x.dtype)) / (1.0 - rate), 0).astype(x.dtype)


def softmax(x, axis=-1):
    """Reference softmax: exp(x - max) / sum."""
    xf = x.astype(_f32(x.dtype))
    e = jnp.exp(xf - lax.stop_gradient(jnp.max(xf, axis=axis, keepdims=True)))
    return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def softmax_cross_entropy(logits, labels, axis=-1):
    """Reference cross-entropy: -sum(labels * log_softmax(logits))."""
    cd = _f32(jnp.result_type(logits.dtype, labels.dtype))
    z = logits.astype(cd)
    m = lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    logp = z - m - jnp.log(jnp.sum(jnp.exp(z - m), axis=axis, keepdims=True))
    return (-jnp.sum(labels.astype(cd) * logp, axis=axis)).astype(jnp.result_type(logits, labels))
