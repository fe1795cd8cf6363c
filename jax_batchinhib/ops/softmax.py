"""Softmax and softmax cross-entropy with hand-derived VJPs.

Derivation: docs/derivations.md, "5. softmax and softmax_cross_entropy".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jax_batchinhib.ops import _stats as S


def softmax(x, axis: int = -1):
    r"""Softmax along ``axis``: :math:`a = e^{x}/\sum e^{x}` (shifted by the max).

    Backward: :math:`dx = (da - \langle da, a\rangle) \odot a`. Computed in
    float32 for float16/bfloat16 inputs; the output keeps the input dtype.

    Args:
      x: floating array with at least one dimension.
      axis: the axis to normalize over.

    Returns:
      ``a``, ``x``'s shape and dtype, summing to 1 along ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_batchinhib import softmax
      >>> a = softmax(jnp.array([0.0, jnp.log(3.0)]))
      >>> [round(v, 3) for v in a.tolist()]
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
    max-shifted log-sum-exp, so logits of ±1000 stay finite, and a class with label 0
    adds nothing even at logit ``-inf`` (:math:`0 \log 0 = 0`, as
    ``optax.safe_softmax_cross_entropy``): masked classes give a finite loss and a finite
    ``dz``. (A label > 0 on a class at ``-inf`` gives about ``t * finfo.max``, 3.4e38·t in
    float32, where the exact loss and optax's are ``inf``.) Backward:
    :math:`dz = g\,((\sum_k t_k)\,\mathrm{softmax}(z) - t)` (that is
    :math:`y_B - \hat y_B` for normalized labels), :math:`dt = -g \log\mathrm{softmax}(z)`.
    When only the logits need a gradient (float32/float64 logits), the forward keeps
    :math:`e^{z - \max z}` and :math:`\sum_k t_k / \sum_k e^{z_k - \max z}` (the bytes of the
    logits) and the backward is :math:`g\,(e \cdot \sum t / \sum e - t)`, with no exp;
    otherwise it keeps the logits and the log-sum-exp.

    Args:
      logits: floating array ``z``.
      labels: floating array ``t`` of ``logits``' shape: probabilities over ``axis``.
      axis: the class axis.

    Returns:
      The loss with ``axis`` removed, in the dtype of ``logits`` (computed in at least
      float32).

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


def _sce_loss(axis, z, t, lse, logits, labels):
    # 0 log 0 = 0: a class whose label is 0 adds nothing, even at logit -inf (masked
    # classes), where t * (lse - z) would be 0 * inf = NaN. Clamping z at the dtype's
    # lowest finite value does it without a select: XLA:CPU keeps the max inside the
    # reduction's fusion, while a select makes it write the (M, N) terms first.
    zc = jnp.maximum(z, jnp.finfo(z.dtype).min)
    return jnp.sum(t * (lse - zc), axis=axis).astype(logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sce(axis, logits, labels):
    z, t, lse = _sce_parts(axis, logits, labels)
    return _sce_loss(axis, z, t, lse, logits, labels)


def _sce_fwd(axis, logits, labels):
    # symbolic_zeros: the primals come wrapped with whether each needs a gradient.
    labels_perturbed = labels.perturbed
    logits, labels = logits.value, labels.value
    cd = S.compute_dtype(jnp.result_type(logits.dtype, labels.dtype))
    z = logits.astype(cd)
    t = labels.astype(cd)
    if labels_perturbed or cd != logits.dtype:
        # dt = -g log softmax(z) needs z (log of the kept probabilities would underflow to
        # -inf below e^-87); low-precision logits are kept in their own dtype (half the
        # bytes of float32 probabilities). The backward recomputes exp(z - lse).
        lse = _lse(axis, z)
        return _sce_loss(axis, z, t, lse, logits, labels), (logits, labels, lse, None)
    # Only dz is needed: keep e = exp(z - max) and 1/sum(e) (the bytes of the logits), so
    # the backward is dz = g (sum(t) e / sum(e) - t) with no exp: the one exp of the
    # forward feeds both the log-sum-exp and the backward.
    mx = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    e = jnp.exp(z - mx)
    se = jnp.sum(e, axis=axis, keepdims=True)
    lse = mx + jnp.log(se)
    loss = _sce_loss(axis, z, t, lse, logits, labels)
    st = jnp.sum(t, axis=axis, keepdims=True)
    return loss, (e, labels, st / se)


def _sce_bwd(axis, res, g):
    if isinstance(g, SymbolicZero):
        return None, None
    if len(res) == 3:
        e, labels, w = res  # w = sum(t) / sum(e)
        cd = e.dtype
        g = jnp.expand_dims(g.astype(cd), axis)
        dz = g * (w * e - labels.astype(cd))
        return dz.astype(e.dtype), None
    logits, labels, lse, _ = res
    cd = lse.dtype
    z = logits.astype(cd)
    t = labels.astype(cd)
    logp = z - lse
    g = jnp.expand_dims(g.astype(cd), axis)
    dz = g * (jnp.sum(t, axis=axis, keepdims=True) * jnp.exp(logp) - t)
    dt = -g * logp
    return dz.astype(logits.dtype), dt.astype(labels.dtype)


_sce.defvjp(_sce_fwd, _sce_bwd, symbolic_zeros=True)
