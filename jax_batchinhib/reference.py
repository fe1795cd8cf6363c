"""Naive forward passes of every op in plain ``jax.numpy``, with no custom rule.

These are the ground truth: ``jax.vjp`` of a function here is what each hand-derived
rule in :mod:`jax_batchinhib.ops` is proved against (:func:`jax_batchinhib.testing.check_vjp`).
They share no code with the ops on purpose: the formulas are written out as the
derivation states them, one line per equation, in at least float32. They are also
what a module uses with ``use_autodiff=True`` (forward-mode autodiff, ``jax.jvp``,
``jax.hessian``, works through these and not through a ``custom_vjp``).

Same signatures and return values as the ops (``virtual_batch_size`` included: the
reference is ``jax.vmap``-ed over the ghost batches); the references do not validate
their arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops.batch_inhib import RELATIVE_GUARD_FLOOR, InhibOptions, InhibStats
from jax_batchinhib.ops.batch_norm import BatchStats

#: Full-precision matmuls: on GPUs the default float32 matmul may run in TF32 (10-bit
#: mantissa), which would make the ground truth itself wrong at 1e-3.
_HIGHEST = lax.Precision.HIGHEST


def _f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _axes(x, axis):
    axis = axis % x.ndim
    return axis, tuple(a for a in range(x.ndim) if a != axis)


def _bshape(x, axis):
    return tuple(x.shape[a] if a == axis else 1 for a in range(x.ndim))


def _psum(v, axis_name, axis_index_groups=None):
    return v if axis_name is None else lax.psum(v, axis_name, axis_index_groups=axis_index_groups)


def _weights(x, mask, axis, dtype):
    if mask is None:
        return jnp.ones((1,) * x.ndim, dtype)
    mask = jnp.asarray(mask)
    if mask.ndim == x.ndim - 1 and x.ndim > 1:
        mask = jnp.expand_dims(mask, axis)
    return mask.astype(dtype)


def _ghost_batches(op, x, mask, v):
    """Ghost batches in plain JAX: ``op(xs, mask)`` on each run of ``v`` rows of the
    leading axis (``jax.vmap`` over the sub-batches), the statistics averaged."""
    b = x.shape[0]
    xg = x.reshape((b // v, v) + tuple(x.shape[1:]))
    if mask is None:
        y, stats = jax.vmap(lambda xs: op(xs, None))(xg)
    else:
        mask = jnp.asarray(mask)
        mask = jnp.broadcast_to(mask, (b,) + tuple(mask.shape[1:]))
        y, stats = jax.vmap(op)(xg, mask.reshape((b // v, v) + tuple(mask.shape[1:])))
    return y.reshape(x.shape), jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


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
    """Reference batch norm: mean, biased variance, normalize, scale and shift."""
    if virtual_batch_size is not None:

        def op(xs, ms):
            return batch_norm(
                xs, scale, bias, axis=axis % x.ndim, epsilon=epsilon, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms, use_fast_variance=use_fast_variance,
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size)
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    w = jnp.broadcast_to(_weights(x, mask, axis, cd), x.shape)
    n = _psum(jnp.sum(w, axis=red, keepdims=True), axis_name, axis_index_groups)
    mean = _psum(jnp.sum(w * xf, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    var = (
        _psum(jnp.sum(w * (xf - mean) ** 2, axis=red, keepdims=True), axis_name, axis_index_groups)
        / n
    )
    y = (xf - mean) / jnp.sqrt(var + epsilon)
    if scale is not None:
        y = y * scale.astype(cd).reshape(_bshape(x, axis))
    if bias is not None:
        y = y + bias.astype(cd).reshape(_bshape(x, axis))
    return y.astype(x.dtype), BatchStats(mean.reshape(-1), var.reshape(-1))


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
                xs, bias, axis=axis % x.ndim, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms, use_fast_variance=use_fast_variance,
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size)
    cd = _f32(x.dtype)
    axis, red = _axes(x, axis)
    xf = x.astype(cd)
    w = jnp.broadcast_to(_weights(x, mask, axis, cd), x.shape)
    n = _psum(jnp.sum(w, axis=red, keepdims=True), axis_name, axis_index_groups)
    mean = _psum(jnp.sum(w * xf, axis=red, keepdims=True), axis_name, axis_index_groups) / n
    y = xf - mean
    if bias is not None:
        y = y + bias.astype(cd).reshape(_bshape(x, axis))
    return y.astype(x.dtype), BatchStats(mean.reshape(-1), None)


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
    """Seed 000 eqs 1.2-1.4 from a covariance (G, n, n): R (G, n, n)."""
    rho, epsilon, guard = opts.rho, opts.epsilon, opts.guard
    correlation, denominator, guard_mode = opts.correlation, opts.denominator, opts.guard_mode
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
    virtual_batch_size=None,
    use_fast_variance=True,
):
    """Reference BatchInhib (seed 000 eqs 1.1-1.5), statistics stop-gradient."""
    opts = InhibOptions(rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    if virtual_batch_size is not None:

        def op(xs, ms):
            return batch_inhib(
                xs, alpha, axis=axis % x.ndim, axis_name=axis_name,
                axis_index_groups=axis_index_groups, mask=ms,
                use_fast_variance=use_fast_variance, **opts.kwargs(),
            )  # fmt: skip

        return _ghost_batches(op, x, mask, virtual_batch_size)
    cd = _f32(x.dtype)
    axis = axis % x.ndim
    xt = jnp.moveaxis(x, axis, -1)
    N = xt.shape[-1]
    X = xt.reshape(-1, N).astype(cd)
    if mask is None:
        w = jnp.ones((X.shape[0], 1), cd)
    else:
        mk = jnp.asarray(mask)
        if mk.ndim == x.ndim:
            mk = jnp.squeeze(jnp.moveaxis(mk, axis, -1), -1)
        w = jnp.broadcast_to(mk, xt.shape[:-1]).reshape(-1, 1).astype(cd)
    n = _psum(jnp.sum(w), axis_name, axis_index_groups)
    mu = _psum(jnp.sum(w * X, axis=0), axis_name, axis_index_groups) / n  # (1.1)
    Xg = X.reshape(X.shape[0], groups, N // groups)
    Xc = Xg - mu.reshape(groups, N // groups)
    cov = (
        _psum(
            jnp.einsum("mgi,mgk->gik", w[:, :, None] * Xc, Xc, precision=_HIGHEST),
            axis_name,
            axis_index_groups,
        )
        / n
    )
    a3 = alpha[None] if groups == 1 else alpha
    R = _inhibition(cov, a3.astype(cd), opts)
    Y = Xg - jnp.einsum("mgl,gil->mgi", Xg, R, precision=_HIGHEST)  # (1.5)
    y = jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), -1, axis)
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
    axis = axis % x.ndim
    xt = jnp.moveaxis(x, axis, -1)
    N = xt.shape[-1]
    Xg = xt.reshape(-1, groups, N // groups).astype(cd)
    a3 = alpha[None] if groups == 1 else alpha
    c3 = cov[None] if groups == 1 else cov
    R = _inhibition(c3.astype(cd), a3.astype(cd), opts)
    Y = Xg - jnp.einsum("mgl,gil->mgi", Xg, R, precision=_HIGHEST)
    return jnp.moveaxis(Y.reshape(xt.shape).astype(x.dtype), -1, axis)


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
    return (-jnp.sum(labels.astype(cd) * logp, axis=axis)).astype(logits.dtype)
