r"""What the linen and NNX modules share (private).

A module of either family holds its parameters and running statistics; everything else
is here: the mode flag, the checks of the input against the layer (feature axis,
feature count, mask), the statistics each layer keeps and their initial values, the
dtype policy, and one call of the running-statistics step (:mod:`jax_batchinhib.running`)
that returns the output and the new :class:`~jax_batchinhib.running.RunningStats`.

Nothing here imports flax: :mod:`jax_batchinhib.nnx` does not load
:mod:`jax_batchinhib.linen`, nor the other way round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jax.nn import initializers

from jax_batchinhib import running
from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops import whitening as _wh
from jax_batchinhib.ops.batch_inhib import InhibOptions, _check_batch_epsilon, alpha_shape
from jax_batchinhib.running import RunningStats

Initializer = Any

#: The layers' kinds, and the running-statistics step of each.
STEPS = {
    "batch_norm": running.batch_norm_step,
    "batch_center": running.batch_center_step,
    "batch_inhib": running.batch_inhib_step,
    "iter_norm": running.whitening_step,
    "zca_norm": running.whitening_step,
}

#: The whitening layers' kinds.
WHITENING = ("iter_norm", "zca_norm")


def near_identity_alpha_init(rho: float = 1.0, value: float = -12.0) -> Initializer:
    r"""BatchInhib's default ``alpha`` initializer: the constant ``value / rho``.

    Why: R is normalized by its denominator, :math:`R_{ik} = g_{ik} r_{ik} / D_i` with
    :math:`D_i = \sum_{l\ne i} g_{il} r_{il}`, so scaling every :math:`g(\alpha)` by the
    same factor leaves R unchanged *except* through the guarded reciprocal
    :math:`h(D) = D/(D^2+\delta^2)` (``guard`` = δ = 1e-3). With a constant small g,
    :math:`|D_i| \le g \sum_l |r_{il}|` and :math:`|h(D)| \le |D|/\delta^2`, hence

    .. math::
        \sum_k |R_{ik}| \le (g/\delta)^2 \Big(\sum_{l\ne i} |r_{il}|\Big)^2 :

    the layer starts as the identity up to that. With ``value = -12`` and rho = 1,
    :math:`g = \mathrm{softplus}(-12) = 6.1\cdot10^{-6}`, :math:`(g/\delta)^2 =
    3.8\cdot10^{-5}`: rows of R sum to at most 0.3% for 10 features all correlated at
    0.99, 3.6% for 32 such features (use a more negative value for wider layers; the
    bound is held by ``tests/test_linen.py``,
    ``test_batch_inhib_default_init_is_near_identity_and_eval_identity_before_training``).
    The gradient is small as well (:math:`\partial R/\partial\alpha \approx 2R` in this
    regime), so an optimizer with normalized steps (Adam: about lr per step and entry)
    raises alpha where inhibition lowers the loss; plain SGD barely moves it. For
    full-strength inhibition from the start use ``alpha_init=jax.nn.initializers.zeros``
    (:math:`g = \log 2` everywhere: R is the row-normalized correlation).
    """
    return initializers.constant(value / rho)


def identity_cov(shape, dtype):
    """The initial running covariance: the identity (per group)."""
    n = shape[-1]
    eye = jnp.eye(n, dtype=dtype)
    return eye if len(shape) == 2 else jnp.broadcast_to(eye, shape)


# ----------------------------------------------------------------------------- checks


def mode_flag(where: str, arg: str, v) -> bool:
    """``use_running_average`` / ``deterministic``: a bool known at trace time (a concrete
    0-d bool array too, as flax's truthiness takes). A string such as "False" counted as
    True, and a traced value failed in Python's ``bool`` without naming the module."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{where}: {arg} must be a bool known at trace time (it picks the computation); "
            f"got a traced value. Pass it as a static argument (jax.jit(..., "
            f"static_argnames=...)) or set it on the module"
        )
    if C.concrete_0d(v) and v.dtype == np.bool_:
        v = bool(v)
    return C.flag(where, arg, v)


def merge_flag(where: str, arg: str, attr, call) -> bool:
    """linen: the mode flag given at construction or at call time, not both (flax's
    merge_param, with an error that names the module and the argument)."""
    if attr is None and call is None:
        raise ValueError(
            f"{where}: {arg} was given nowhere; pass it at construction "
            f"({where.split(' ')[0]}(..., {arg}=True/False)) or at call time "
            f"(layer(x, {arg}=True/False))"
        )
    if attr is not None and call is not None:
        raise ValueError(
            f"{where}: {arg} was given both at construction ({arg}={attr!r}) and at call "
            f"time ({arg}={call!r}); give it in one place only"
        )
    return mode_flag(where, arg, attr if call is None else call)


def first_flag(where: str, arg: str, call, attr) -> bool:
    """NNX: the call-time value if given, else the attribute (flax.nnx's precedence)."""
    if call is not None:
        return mode_flag(where, arg, call)
    if attr is not None:
        return mode_flag(where, arg, attr)
    raise ValueError(
        f"{where}: {arg} was given nowhere; pass it at construction "
        f"({where}(..., {arg}=True/False)), at call time (layer(x, {arg}=True/False)), or "
        f"set the mode with model.train() / model.eval()"
    )


def feature_axes(where: str, axis, ndim: int):
    """``axis`` as the layers take it: one int (returned as a non-negative int), or a
    tuple/list of ints, flax's several feature axes (returned sorted, non-negative, as a
    tuple of at least two; a one-element tuple is its int)."""
    many = isinstance(axis, tuple | list)
    for a in tuple(axis) if many else (axis,):
        if not C.is_int(a):  # the ops' words
            raise TypeError(f"{where}: axis must be an int or a tuple of ints; got {axis!r}")
    if not many:
        return C.axis(where, axis, ndim)
    axes = tuple(C.axis(where, a, ndim) for a in axis)
    if not axes:
        raise ValueError(f"{where}: axis must be an int or a non-empty tuple of ints; got ()")
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"{where}: axis {tuple(axis)!r} names the same axis twice (x has {ndim} "
            f"dimensions); give each feature axis once"
        )
    if len(axes) == ndim:
        raise ValueError(
            f"{where}: axis {tuple(axis)!r} makes every axis of x a feature axis; at least "
            f"one axis must be left to compute the statistics over"
        )
    return axes[0] if len(axes) == 1 else tuple(sorted(axes))


def feature_shape(x, ax) -> tuple[int, ...]:
    """The shape of one feature vector: ``(N,)`` for one axis, the sizes of the feature
    axes for several (flax.linen's parameter and statistics shape)."""
    axes = ax if isinstance(ax, tuple) else (ax,)
    return tuple(C.dim(x.shape[a]) for a in axes)


def check_input(where: str, x, axis, mask, num_features: int | None = None):
    """Check ``x`` (real: an integer or boolean x is promoted to floating point by the
    dtype policy, as flax's; ``axis`` in range; the layer's feature count when known:
    for several feature axes the product of their sizes, as flax.nnx) and the mask (its
    dtype, and its shape against x's: see ``ops._stats.mask_shape``); return the feature
    axis (non-negative int) or axes (sorted tuple)."""
    dtype = jnp.result_type(x)
    real = (jnp.floating, jnp.integer, jnp.bool_)
    if not any(jnp.issubdtype(dtype, k) for k in real):
        C.float_array(where, "x", x)  # its error: a real floating-point array expected
    ax = feature_axes(where, axis, jnp.ndim(x))
    n = math.prod(feature_shape(x, ax))
    if num_features is not None and n != num_features:
        raise ValueError(
            f"{where}: x has {n} features on axis {axis} (shape {tuple(x.shape)}), "
            f"but the layer was built with num_features={num_features}"
        )
    if mask is not None:
        S.mask_shape(where, mask, jnp.shape(x), ax if isinstance(ax, tuple) else (ax,))
    return ax


def single_axis(where: str, axis, ax) -> int:
    """The whitening layers (IterNorm, ZCANorm) take one feature axis only."""
    if isinstance(ax, tuple):
        raise TypeError(
            f"{where}: axis must be an int (one feature axis: the features are whitened "
            f"together by an N x N matrix); got {axis!r}"
        )
    return ax


def inhib_options(where: str, mdl, n: int | None = None) -> InhibOptions:
    """A BatchInhib module's options (its attributes), validated with its name."""
    check_epsilon(where, mdl)  # > 0 in the module (POSITIVE_EPSILON)
    opts = InhibOptions.checked(
        where, rho=mdl.rho, epsilon=mdl.epsilon, groups=mdl.groups,
        correlation=mdl.correlation, denominator=mdl.denominator, guard=mdl.guard,
        guard_mode=mdl.guard_mode,
    )  # fmt: skip
    if n is not None:
        opts.check_features(where, n)
    return opts


#: layers whose epsilon must be > 0, with their op's check: it keeps a denominator that a
#: constant feature of the batch would make 0 (BatchInhib's s, the whitening ops'
#: eigenvalues); BatchNorm's and BatchCenter's may be 0, as flax's and PyTorch's
POSITIVE_EPSILON = {
    "BatchInhib": _check_batch_epsilon,
    "IterNorm": _wh._check_whitening_epsilon,
    "ZCANorm": _wh._check_whitening_epsilon,
}


def check_epsilon(where: str, mdl) -> None:
    """The module's epsilon, with its op's check (> 0, or >= 0), named ``where``."""
    for c in type(mdl).__mro__:
        if c.__name__ in POSITIVE_EPSILON:
            POSITIVE_EPSILON[c.__name__](where, mdl.epsilon)
            return
    C.epsilon(where, mdl.epsilon)


#: the statistics layers' bool attributes (a string "False" would count as True)
FLAGS = (
    "use_bias",
    "use_scale",
    "use_fast_variance",
    "force_float32_reductions",
    "unbiased",
    "use_autodiff",
)


def check_dtype(where: str, name: str, v, optional: bool) -> None:
    """``dtype`` (None allowed) or ``param_dtype``: a real floating-point dtype."""
    if v is None and optional:
        return
    try:
        d = jnp.dtype(v)
    except TypeError:
        d = None
    if d is None or not jnp.issubdtype(d, jnp.floating):
        none = " or None" if optional else ""
        got = repr(v) if d is None else str(d)
        raise TypeError(
            f"{where}: {name} must be a floating-point dtype (e.g. jnp.float32, "
            f"jnp.bfloat16){none}; got {got}"
        )


def check_initializer(where: str, name: str, init) -> None:
    """``scale_init`` / ``bias_init`` / ``alpha_init``: a callable ``(key, shape, dtype)``."""
    if not callable(init):
        raise TypeError(
            f"{where}: {name} must be an initializer, a callable (key, shape, dtype) -> "
            f"array such as jax.nn.initializers.ones; got {init!r}"
        )


def check_common(where: str, mdl) -> float | None:
    """The attributes every statistics layer has; returns the momentum. Run at every
    call (linen) or forward (NNX), so that an attribute changed after construction is
    checked too."""
    if hasattr(mdl, "epsilon"):
        check_epsilon(where, mdl)
    C.virtual_batch_size(where, mdl.virtual_batch_size)
    for name in FLAGS:
        if hasattr(mdl, name):
            C.flag(where, name, getattr(mdl, name))
    if hasattr(mdl, "dtype"):
        check_dtype(where, "dtype", mdl.dtype, optional=True)
    if hasattr(mdl, "param_dtype"):
        check_dtype(where, "param_dtype", mdl.param_dtype, optional=False)
    return C.momentum(where, mdl.momentum)


@dataclasses.dataclass(frozen=True)
class WhitenOptions:
    """The options of an IterNorm / ZCANorm module, validated with its name."""

    method: str  # "iter" or "zca"
    groups: int
    iterations: int
    epsilon: float

    @classmethod
    def checked(cls, where: str, kind: str, mdl, n: int | None = None) -> WhitenOptions:
        """Validate ``groups`` (against N when known), ``iterations`` (IterNorm) and
        ``epsilon`` (> 0), with errors that name the module."""
        method = "iter" if kind == "iter_norm" else "zca"
        iterations = getattr(mdl, "iterations", 1)
        if method == "iter":
            _wh._check_iterations(where, iterations)
        _wh._check_whitening_epsilon(where, mdl.epsilon)
        groups = C.groups(where, mdl.groups, n)  # n None: its divisibility checked later
        return cls(method, groups, int(iterations), float(mdl.epsilon))


# ---------------------------------------------------------------------------- statistics


def stat_specs(kind: str, n, dtype, momentum, groups: int = 1) -> dict:
    """The running statistics of a layer: ``name -> (shape, init)`` with ``init()`` the
    initial value (mean 0, variance 1, covariance the identity, count 0). ``n``: the
    number of features, or the feature shape (several feature axes)."""
    fshape = tuple(n) if isinstance(n, tuple) else (n,)
    specs = {"mean": (fshape, lambda: jnp.zeros(fshape, dtype))}
    if kind in WHITENING:
        wshape = (groups, n // groups, n // groups)
        specs["whitening_matrix"] = (wshape, lambda: identity_cov(wshape, dtype))
        if momentum is None:
            specs["count"] = ((), lambda: jnp.zeros((), jnp.int32))
        return specs
    if kind != "batch_center":
        specs["var"] = (fshape, lambda: jnp.ones(fshape, dtype))
    if kind == "batch_inhib":
        ashape = alpha_shape(n, groups)
        specs["cov"] = (ashape, lambda: identity_cov(ashape, dtype))
    if momentum is None:
        cshape = () if kind == "batch_inhib" else fshape
        specs["count"] = (cshape, lambda: jnp.zeros(cshape, jnp.int32))
    return specs


def stats_dtype(mdl):
    """dtype of a layer's stored statistics (see :func:`running.stats_dtype`)."""
    return running.stats_dtype(mdl.param_dtype, mdl.force_float32_reductions)


# ----------------------------------------------------------------------------- forward


def out_dtype(dtype, *arrays):
    """flax's dtype policy (``flax.linen.dtypes.canonicalize_dtype``): ``dtype`` if given,
    else the promoted dtype of the inputs and parameters, at least inexact (float32
    parameters make a bfloat16 input's output float32)."""
    if dtype is None:
        dtype = jnp.result_type(*[jnp.asarray(a) for a in arrays if a is not None])
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.dtype(dtype)


def compute_input(x, out):
    """x in a dtype at least as wide as the output (the op computes in at least
    float32 and returns its input's dtype)."""
    return x.astype(jnp.promote_types(x.dtype, out))


def values_per_feature(x, axis):
    """The number of values of each feature in ``x`` (``axis``: one feature axis or a
    tuple of them); symbolic under shape-polymorphic ``jax.export``."""
    axes = axis if isinstance(axis, tuple) else (axis % x.ndim,)
    return math.prod(C.dim(d) for a, d in enumerate(x.shape) if a not in axes)


def training_form_ok(x, axis, mask, axis_name, virtual_batch_size=None) -> bool:
    """During init, a batch of one value per feature, or one that ``virtual_batch_size``
    does not divide (the usual dummy batch of 1), gets the inference form: flax's init
    accepts any batch, init updates no statistics, and our training form refuses both."""
    if virtual_batch_size is not None and x.ndim and x.shape[0] % virtual_batch_size:
        return False
    per_feature = values_per_feature(x, axis)
    if export.is_symbolic_dim(per_feature):  # a symbolic batch (jax.export): trained
        return True
    return mask is not None or axis_name is not None or per_feature > 1


def _flat_features(kind, where, x, params, state, step, kw):
    """Several feature axes (``step.axis``, a sorted tuple): the op sees them moved last
    and flattened into one (a transpose when they are not already trailing), which
    normalizes per feature position over every other axis exactly as flax's tuple
    ``axis``; parameters and statistics (feature-shaped or flat) are flattened for the
    op and the new statistics get their stored shapes back. BatchInhib's N features are
    the flattened feature positions (the op's tuple ``axis`` flattens them in the same
    order): its alpha and cov (N, N) / (G, N/G, N/G) and its scalar count pass as they
    are; its mean and var are stored flat (N,)."""
    axes = step.axis
    other = tuple(a for a in range(x.ndim) if a not in axes)
    perm = other + axes
    if step.virtual_batch_size is not None and 0 in axes:
        raise ValueError(
            f"{where}: virtual_batch_size splits the leading axis into ghost batches, but "
            f"axis {axes!r} makes it a feature axis"
        )
    xt = jnp.transpose(x, perm)
    xf = jnp.reshape(xt, (*xt.shape[: len(other)], -1))
    mask = kw["mask"]
    if mask is not None:
        # x's rank first, read against x's own shape (a row mask gets feature dimensions
        # of 1, a broadcast one leading 1s); a mask that varies along some feature axis
        # is spelled out along all of them; then the feature dimensions are flattened
        mask = S.mask_shape(where, mask, x.shape, axes)
        ms = tuple(jnp.shape(mask))
        if any(ms[a] != 1 for a in axes):
            ms = tuple(C.dim(x.shape[a]) if a in axes else d for a, d in enumerate(ms))
            mask = jnp.broadcast_to(mask, ms)
        mask = jnp.reshape(jnp.transpose(mask, perm), (*(ms[a] for a in other), -1))
    if kind == "batch_inhib":
        flat, keep = params, ("cov", "count")
    else:
        flat, keep = tuple(None if p is None else jnp.reshape(p, (-1,)) for p in params), ()
    state_f = RunningStats(
        **{k: v if k in keep else jnp.reshape(v, (-1,)) for k, v in state.items()}
    )
    step_f = dataclasses.replace(step, axis=xf.ndim - 1)
    y, new = STEPS[kind](where, xf, *flat, state_f, step_f, **{**kw, "mask": mask})
    y = jnp.transpose(jnp.reshape(y, xt.shape), tuple(perm.index(a) for a in range(x.ndim)))
    return y, RunningStats(**{k: jnp.reshape(v, getattr(state, k).shape) for k, v in new.items()})


def apply(
    kind: str,
    where: str,
    mdl,
    x,
    params: tuple,
    state: RunningStats,
    *,
    axis: int | tuple[int, ...],
    use_running_average: bool,
    update_stats: bool,
    momentum,
    axis_name,
    mask,
    options: InhibOptions | WhitenOptions | None = None,
):
    """One forward of a layer of either family: the dtype policy, then the running step
    of ``kind`` with the module's attributes. ``params``: (scale, bias), (bias,) or
    (alpha,). ``axis``: one feature axis, or several (a sorted tuple, see
    :func:`_flat_features`). Returns ``(y, new_state)``; the module writes ``new_state``
    back."""
    if not use_running_average and not training_form_ok(x, axis, mask, axis_name):
        per = values_per_feature(x, axis)
        raise ValueError(
            f"{where}: training-mode statistics need more than one value per feature; got x "
            f"of shape {tuple(x.shape)}, {per} value{'' if per == 1 else 's'} per feature. "
            f"Call it in eval mode "
            f"(use_running_average=True) for single examples (torch.nn.BatchNorm refuses a "
            f"batch of one in training mode; flax returns zeros)."
        )
    out = out_dtype(mdl.dtype, x, *params)
    step = running.Step(
        use_running_average=use_running_average,
        update_stats=update_stats,
        momentum=momentum,
        unbiased=getattr(mdl, "unbiased", True),
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=mdl.axis_index_groups,
        use_autodiff=mdl.use_autodiff,
        virtual_batch_size=mdl.virtual_batch_size,
        use_fast_variance=getattr(mdl, "use_fast_variance", True),
    )
    kw = {"mask": mask}
    if kind == "batch_norm":
        kw["epsilon"] = mdl.epsilon
    if kind == "batch_inhib" or kind in WHITENING:
        kw["options"] = options
    if isinstance(axis, tuple):
        y, new = _flat_features(kind, where, compute_input(x, out), params, state, step, kw)
    else:
        y, new = STEPS[kind](where, compute_input(x, out), *params, state, step, **kw)
    return jnp.asarray(y, out), new


def dropout(where: str, rate, use_autodiff: bool, inputs, key, broadcast_dims=()):
    """Dropout of either family once the key is known. ``broadcast_dims`` (flax's): the
    axes along which one mask entry is shared, negative allowed (checked against
    ``inputs`` here, so the error names the module)."""
    rate = C.rate(where, rate)
    dims = broadcast_axes(where, broadcast_dims, jnp.ndim(inputs))
    impl = running._impl(use_autodiff)
    if not dims:
        return impl.dropout(inputs, rate, key)
    return impl.dropout(inputs, rate, key, broadcast_dims=dims)


def check_broadcast_dims(where: str, broadcast_dims) -> tuple:
    """``broadcast_dims`` as given at construction: a sequence of ints."""
    try:
        dims = tuple(broadcast_dims)
    except TypeError:
        dims = None
    if dims is None or any(not C.is_int(d) for d in dims):
        raise TypeError(
            f"{where}: broadcast_dims must be a sequence of ints (axes that share one mask "
            f"entry, e.g. (1, 2) for spatial dropout on NHWC); got {broadcast_dims!r}"
        )
    return dims


def broadcast_axes(where: str, broadcast_dims, ndim: int) -> tuple:
    """``broadcast_dims`` for an ``ndim``-dimensional input: non-negative, sorted, each
    once (flax accepts negative and repeated axes)."""
    dims = check_broadcast_dims(where, broadcast_dims)
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(
                f"{where}: broadcast_dims {dims!r} has axis {d}, out of range for inputs with "
                f"{ndim} dimensions; expected ints in [{-ndim}, {ndim - 1}]"
            )
    return tuple(sorted({d % ndim for d in dims}))


def check_dropout(where: str, rate, broadcast_dims=()) -> None:
    C.rate(where, rate)
    check_broadcast_dims(where, broadcast_dims)
