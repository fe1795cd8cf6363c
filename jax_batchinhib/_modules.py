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

from typing import Any

import jax.numpy as jnp
from jax.nn import initializers

from jax_batchinhib import running
from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops.batch_inhib import InhibOptions, alpha_shape
from jax_batchinhib.running import RunningStats

Initializer = Any

#: The layers' kinds, and the running-statistics step of each.
STEPS = {
    "batch_norm": running.batch_norm_step,
    "batch_center": running.batch_center_step,
    "batch_inhib": running.batch_inhib_step,
}


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
    3.7\cdot10^{-5}`: rows of R sum to at most 0.4% for 10 features all correlated at
    0.99, 3.6% for 32 such features (use a more negative value for wider layers). The
    gradient is small as well (:math:`\partial R/\partial\alpha \approx 2R` in this
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
    return bool(attr if call is None else call)


def first_flag(where: str, arg: str, call, attr) -> bool:
    """NNX: the call-time value if given, else the attribute (flax.nnx's precedence)."""
    if call is not None:
        return bool(call)
    if attr is not None:
        return bool(attr)
    raise ValueError(
        f"{where}: {arg} was given nowhere; pass it at construction "
        f"({where}(..., {arg}=True/False)), at call time (layer(x, {arg}=True/False)), or "
        f"set the mode with model.train() / model.eval()"
    )


def check_input(where: str, x, axis, mask, num_features: int | None = None) -> int:
    """Check ``x`` (floating, ``axis`` in range, the layer's feature count when known)
    and the mask's dtype; return the feature axis, non-negative."""
    C.float_array(where, "x", x)
    ax = C.axis(where, axis, jnp.ndim(x))
    if num_features is not None and x.shape[ax] != num_features:
        raise ValueError(
            f"{where}: x has {x.shape[ax]} features on axis {axis} (shape {tuple(x.shape)}), "
            f"but the layer was built with num_features={num_features}"
        )
    C.mask_dtype(where, mask)
    return ax


def inhib_options(where: str, mdl, n: int | None = None) -> InhibOptions:
    """A BatchInhib module's options (its attributes), validated with its name."""
    opts = InhibOptions.checked(
        where, rho=mdl.rho, epsilon=mdl.epsilon, groups=mdl.groups,
        correlation=mdl.correlation, denominator=mdl.denominator, guard=mdl.guard,
        guard_mode=mdl.guard_mode,
    )  # fmt: skip
    if n is not None:
        opts.check_features(where, n)
    return opts


def check_common(where: str, mdl) -> float | None:
    """The attributes every statistics layer has; returns the momentum."""
    if hasattr(mdl, "epsilon"):
        C.epsilon(where, mdl.epsilon)
    C.virtual_batch_size(where, mdl.virtual_batch_size)
    C.flag(where, "use_fast_variance", mdl.use_fast_variance)
    return C.momentum(where, mdl.momentum)


# ---------------------------------------------------------------------------- statistics


def stat_specs(kind: str, n: int, dtype, momentum, groups: int = 1) -> dict:
    """The running statistics of a layer: ``name -> (shape, init)`` with ``init()`` the
    initial value (mean 0, variance 1, covariance the identity, count 0)."""
    specs = {"mean": ((n,), lambda: jnp.zeros((n,), dtype))}
    if kind != "batch_center":
        specs["var"] = ((n,), lambda: jnp.ones((n,), dtype))
    if kind == "batch_inhib":
        ashape = alpha_shape(n, groups)
        specs["cov"] = (ashape, lambda: identity_cov(ashape, dtype))
    if momentum is None:
        cshape = () if kind == "batch_inhib" else (n,)
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


def training_form_ok(x, axis, mask, axis_name) -> bool:
    """During init, a batch of one value per feature gets the inference form (flax's
    init accepts any batch; our training form refuses a single value)."""
    return mask is not None or axis_name is not None or running.values_per_feature(x, axis) > 1


def apply(
    kind: str,
    where: str,
    mdl,
    x,
    params: tuple,
    state: RunningStats,
    *,
    axis: int,
    use_running_average: bool,
    update_stats: bool,
    momentum,
    axis_name,
    mask,
    options: InhibOptions | None = None,
):
    """One forward of a layer of either family: the dtype policy, then the running step
    of ``kind`` with the module's attributes. ``params``: (scale, bias), (bias,) or
    (alpha,). Returns ``(y, new_state)``; the module writes ``new_state`` back."""
    out = out_dtype(mdl.dtype, x, *params)
    kw = dict(
        use_running_average=use_running_average,
        update_stats=update_stats,
        momentum=momentum,
        axis=axis,
        axis_name=axis_name,
        axis_index_groups=mdl.axis_index_groups,
        mask=mask,
        use_autodiff=mdl.use_autodiff,
        virtual_batch_size=mdl.virtual_batch_size,
        use_fast_variance=mdl.use_fast_variance,
    )
    if kind != "batch_center":
        kw["unbiased"] = mdl.unbiased
    if kind == "batch_norm":
        kw["epsilon"] = mdl.epsilon
    if kind == "batch_inhib":
        kw["options"] = options
    y, new = STEPS[kind](where, compute_input(x, out), *params, state, **kw)
    return jnp.asarray(y, out), new


def dropout(where: str, rate, use_autodiff: bool, inputs, key):
    """Dropout of either family once the key is known."""
    return running._impl(use_autodiff).dropout(inputs, C.rate(where, rate), key)


def check_dropout(where: str, rate, broadcast_dims=()) -> None:
    C.rate(where, rate)
    if tuple(broadcast_dims):
        raise ValueError(
            f"{where}: broadcast_dims must be () (the hand-derived dropout draws one mask "
            f"entry per element); got {tuple(broadcast_dims)!r}. Use flax.linen.Dropout "
            f"for shared masks."
        )
