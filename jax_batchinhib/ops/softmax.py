"""Softmax and softmax cross-entropy with hand-derived VJPs (seed 001)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_batchinhib.ops import _stats as S


def softmax(x, axis: int = -1):
    r"""Softmax along ``axis``: :math:`a = e^{x}/\sum e^{x}` (shifted by the max).

    Backward (seed 001): :math:`dx = (da - \langle da, a\rangle) \odot a`. Computed in
    float32 for float16/bfloat16 inputs; the output keeps the input dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_batchinhib import softmax
      >>> softmax(jnp.array([0.0, jnp.log(3.0)])).round(3).tolist()
      [0.25, 0.75]
    """
    fn = "softmax"
    S.check_float(fn, "x", x)
    ax = S.normalize_axis(fn, axis, max(jnp.ndim(x), 1))
    if jnp.ndim(x) == 0:
        raise ValueError(f"{fn}: x must have at least one dimension; got a scalar")
    return _softmax(ax, x)


def _softmax_f(axis, x):
    cd = S.compute_dtype(x.dtype)
    xf = x.astype(cd)
    e = jnp.exp(xf - jax.lax.stop_gradient(jnp.max(xf, axis=axis, keepdims=True)))
    return e / jnp.sum(e, axis=axis, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax(axis, x):
    return _softmax_f(axis, x).astype(x.dtype)


def _softmax_fwd(axis, x):
    a = _softmax_f(axis, x)
    return a.astype(x.dtype), (a, jnp.zeros((0,), x.dtype))


def _softmax_bwd(axis, res, da):
    a, x0 = res
    da = da.astype(a.dtype)
    dx = (da - jnp.sum(da * a, axis=axis, keepdims=True)) * a
    return (dx.astype(x0.dtype),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax_cross_entropy(logits, labels, axis: int = -1):
    r"""Per-example cross-entropy :math:`-\sum_k t_k \log\mathrm{softmax}(z)_k` with
    ``labels`` t as probabilities (one-hot or soft) over ``axis``.

    Computed as :math:`(\sum_k t_k)\,\mathrm{lse}(z) - \langle t, z\rangle` with a
    max-shifted log-sum-exp, so logits of ±1000 stay finite. Backward:
    :math:`dz = g\,((\sum_k t_k)\,\mathrm{softmax}(z) - t)` (seed 001's
    :math:`y_B - \hat y_B` for normalized labels), :math:`dt = -g \log\mathrm{softmax}(z)`.

    Returns the loss with ``axis`` removed, in the dtype of ``logits`` (computed in at
    least float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import softmax_cross_entropy
      >>> float(softmax_cross_entropy(jnp.zeros(4), jnp.eye(4)[0])) == float(jnp.log(4.0))
      True
    """
    fn = "softmax_cross_entropy"
    S.check_float(fn, "logits", logits)
    ldt = jnp.result_type(labels)
    if not jnp.issubdtype(ldt, jnp.floating):
        raise TypeError(
            f"{fn}: labels must be probabilities (floating, the shape of logits); got dtype "
            f"{ldt}. For integer class labels use jax.nn.one_hot(labels, num_classes)."
        )
    if jnp.shape(logits) != jnp.shape(labels):
        raise ValueError(
            f"{fn}: labels must have the shape of logits {S.shape_str(jnp.shape(logits))}; "
            f"got {S.shape_str(jnp.shape(labels))}"
        )
    if jnp.ndim(logits) == 0:
        raise ValueError(f"{fn}: logits must have at least one dimension; got a scalar")
    ax = S.normalize_axis(fn, axis, jnp.ndim(logits))
    return _sce(ax, logits, labels)


def _lse(axis, z):
    mx = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    return mx + jnp.log(jnp.sum(jnp.exp(z - mx), axis=axis, keepdims=True))


def _sce_parts(axis, logits, labels):
    cd = S.compute_dtype(jnp.result_type(logits.dtype, labels.dtype))
    z = logits.astype(cd)
    t = labels.astype(cd)
    return z, t, _lse(axis, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sce(axis, logits, labels):
    z, t, lse = _sce_parts(axis, logits, labels)
    return jnp.sum(t * (lse - z), axis=axis).astype(logits.dtype)


def _sce_fwd(axis, logits, labels):
    z, t, lse = _sce_parts(axis, logits, labels)
    loss = jnp.sum(t * (lse - z), axis=axis).astype(logits.dtype)
    return loss, (logits, labels, lse)


def _sce_bwd(axis, res, g):
    logits, labels, lse = res
    cd = lse.dtype
    z = logits.astype(cd)
    t = labels.astype(cd)
    logp = z - lse
    g = jnp.expand_dims(g.astype(cd), axis)
    dz = g * (jnp.sum(t, axis=axis, keepdims=True) * jnp.exp(logp) - t)
    dt = -g * logp
    return dz.astype(logits.dtype), dt.astype(labels.dtype)


_sce.defvjp(_sce_fwd, _sce_bwd)
