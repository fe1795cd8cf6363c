"""Softmax and softmax cross-entropy with hand-derived VJPs.

Derivation: docs/derivations.md, "5. softmax and softmax_cross_entropy".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S


def _class_axis(fn: str, name: str, x, axis) -> int:
    """The class axis of ``x`` (the argument ``name``) as a non-negative int.

    Raises, naming ``fn`` and the argument: TypeError for an ``axis`` that is not an int
    (a tuple included: softmax normalizes over one class axis), ValueError for a scalar
    ``x``, an axis out of range, or no class along it (size 0: the max and the log-sum-exp
    of no classes are undefined).
    """
    shape = tuple(jnp.shape(x))
    role = f"the one class axis of {name} that softmax normalizes over"
    ax = C.axis(fn, axis, len(shape), name, role)
    if shape[ax] == 0:
        raise ValueError(
            f"{fn}: {name} must have at least one class along axis {axis} (the class "
            f"axis); got shape {S.shape_str(shape)}, with size 0 there"
        )
    return ax


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
    return _softmax(_class_axis(fn, "x", x, axis), x)


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
    ldt = C.dtype_of(fn, "labels", labels)
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
    ax = _class_axis(fn, "logits", logits, axis)
    return _sce(ax, logits, labels)


def _exp_sum(axis, z):
    """``e = exp(z - max z)`` (the max held constant), its sum and the log-sum-exp, all
    keepdims: the one exp both cross-entropies' forwards share with their backwards."""
    mx = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    e = jnp.exp(z - mx)
    se = jnp.sum(e, axis=axis, keepdims=True)
    return e, se, mx + jnp.log(se)


def _lse(axis, z):
    return _exp_sum(axis, z)[2]


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
    e, se, lse = _exp_sum(axis, z)
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
        # e varies where the logits do (shard_map(check_vma=True)); dz also where the
        # labels do: summed over those devices, as autodiff does (S.param_ct)
        return S.param_ct(dz.astype(e.dtype), e), None
    logits, labels, lse, _ = res
    cd = lse.dtype
    z = logits.astype(cd)
    t = labels.astype(cd)
    logp = z - lse
    g = jnp.expand_dims(g.astype(cd), axis)
    dz = g * (jnp.sum(t, axis=axis, keepdims=True) * jnp.exp(logp) - t)
    dt = -g * logp
    return S.param_ct(dz.astype(logits.dtype), logits), S.param_ct(dt.astype(labels.dtype), labels)


_sce.defvjp(_sce_fwd, _sce_bwd, symbolic_zeros=True)


def softmax_cross_entropy_with_integer_labels(logits, labels, axis: int = -1):
    r"""Per-example cross-entropy :math:`\mathrm{lse}(z) - z_y` with ``labels`` y as class
    indices (optax's ``softmax_cross_entropy_with_integer_labels``): no one-hot array.

    The forward picks :math:`z_y` with a gather of one value per example. Backward:
    :math:`dz = g\,(\mathrm{softmax}(z) - e_y)`: :math:`g\,\mathrm{softmax}(z)`, then
    :math:`-g` added at each label (a scatter of one value per example). For
    float32/float64 logits the forward keeps :math:`e^{z - \max z}` and
    :math:`1 / \sum_k e^{z_k - \max z}` and the backward has no exp; for
    float16/bfloat16 it keeps the logits and the log-sum-exp (half the bytes) and
    recomputes the exp. Masked classes (logit ``-inf``) other than the label add nothing.
    A negative label counts from the end (JAX's indexing, as optax's); one outside
    ``[-C, C)`` cannot be refused at trace time: its loss is NaN (JAX's out-of-bounds
    gather fill, as optax's) and its ``dz`` is ``g softmax(z)``.

    Args:
      logits: floating array ``z``.
      labels: integer array of ``logits``' shape without ``axis``: the class of each
        example, in ``[0, C)`` with C = ``logits.shape[axis]`` (or ``[-C, 0)``, from
        the end).
      axis: the class axis.

    Returns:
      The loss, ``labels``' shape, in the dtype of ``logits`` (computed in at least
      float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax_batchinhib import softmax_cross_entropy_with_integer_labels as sce
      >>> float(sce(jnp.zeros((1, 4)), jnp.array([2]))[0]) == float(jnp.log(4.0))
      True
    """
    fn = "softmax_cross_entropy_with_integer_labels"
    S.check_float(fn, "logits", logits)
    ldt = C.dtype_of(fn, "labels", labels)
    if not jnp.issubdtype(ldt, jnp.integer):
        raise TypeError(
            f"{fn}: labels must be integer class indices; got dtype {ldt}. For labels as "
            f"probabilities (one-hot or soft) use softmax_cross_entropy."
        )
    ax = _class_axis(fn, "logits", logits, axis)
    want = tuple(d for i, d in enumerate(jnp.shape(logits)) if i != ax)
    if tuple(jnp.shape(labels)) != want:
        raise ValueError(
            f"{fn}: labels must have the shape of logits {S.shape_str(jnp.shape(logits))} "
            f"without axis {ax}, {S.shape_str(want)}; got {S.shape_str(jnp.shape(labels))}"
        )
    return _sce_int(ax, logits, jnp.asarray(labels))


def _label_logit(axis, z, labels):
    # one value per example; out-of-range labels read NaN (mode="fill"), as optax's
    idx = jnp.expand_dims(labels, axis)
    return jnp.squeeze(jnp.take_along_axis(z, idx, axis=axis, mode="fill"), axis)


def _sce_int_loss(axis, z, labels, lse, dtype):
    return (jnp.squeeze(lse, axis) - _label_logit(axis, z, labels)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sce_int(axis, logits, labels):
    z = logits.astype(S.compute_dtype(logits.dtype))
    return _sce_int_loss(axis, z, labels, _lse(axis, z), logits.dtype)


def _sce_int_fwd(axis, logits, labels):
    cd = S.compute_dtype(logits.dtype)
    z = logits.astype(cd)
    if cd != logits.dtype:
        # low-precision logits: keep them (half the bytes of float32 probabilities) and
        # recompute exp(z - lse) in the backward
        lse = _lse(axis, z)
        return _sce_int_loss(axis, z, labels, lse, logits.dtype), (logits, labels, lse, None)
    e, se, lse = _exp_sum(axis, z)
    return _sce_int_loss(axis, z, labels, lse, logits.dtype), (e, labels, 1 / se)


def _sce_int_bwd(axis, res, g):
    a, labels, b = res[:3]
    if len(res) == 3:  # (e, labels, 1 / sum e)
        p = a * b
    else:  # (logits, labels, lse, None)
        p = jnp.exp(a.astype(b.dtype) - b)
    g = g.astype(p.dtype)
    # dz = g p everywhere, then -g added at each example's label: a scatter of one value
    # per example (the structure of autodiff's backward of a gather), no one-hot array.
    # Negative labels wrap as in the forward's gather; one out of range adds nothing.
    # The indices in int32 (at least): a row index in the labels' own dtype would wrap
    # past 255 for uint8 labels, or overflow int8's, with more rows than the dtype holds.
    # Under an Explicit mesh the row indices take the labels' sharding and the scatter
    # dz's (an unsharded iota beside sharded labels, or a scatter of unstated output
    # sharding, is a ShardingTypeError); elsewhere the program is unchanged.
    it = jnp.promote_types(labels.dtype, jnp.int32)
    iota = functools.partial(jax.lax.broadcasted_iota, it, labels.shape, **_sharding_kw(labels))
    idx = tuple(labels.astype(it) if i == axis else iota(i - (i > axis)) for i in range(p.ndim))
    dz = jnp.expand_dims(g, axis) * p
    dz = dz.at[idx].add(-g, mode="drop", **_sharding_kw(dz))
    # a (e or the logits) varies where the logits do; dz also where the labels do
    return S.param_ct(dz.astype(a.dtype), a), None


def _sharding_kw(v) -> dict:
    """``{"out_sharding": v's sharding}`` where the sharding is part of ``v``'s type (a
    mesh with an Explicit axis: ``jax.sharding.AxisType.Explicit``), for an array built
    to combine with ``v``; ``{}`` elsewhere."""
    sharding = getattr(jax.typeof(v), "sharding", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if axis_type is None or axis_type.Explicit not in tuple(types):
        return {}
    return {"out_sharding": sharding}


_sce_int.defvjp(_sce_int_fwd, _sce_int_bwd)
