r"""Flax linen modules: BatchNorm, BatchCenter, BatchInhib and Dropout.

They hold parameters (collection ``params``) and running statistics (collection
``batch_stats``); the arithmetic is in the ops (:mod:`jax_batchinhib.ops`, hand-derived
VJPs) and the running-statistics rules in :mod:`jax_batchinhib.running`.

:class:`BatchNorm` is a drop-in replacement for :class:`flax.linen.BatchNorm`: the same
arguments with the same names, defaults and meaning, the same variables (``params``:
``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``), no statistics update during
``init``. Two additions, both from seed 002 / PyTorch:

- ``unbiased=True`` (default) stores ``m/(m-1)`` times the batch variance, like PyTorch;
  ``unbiased=False`` stores what flax stores, so a checkpoint moves between
  ``flax.linen.BatchNorm`` and ours both ways.
- ``momentum=None`` keeps the cumulative average over all batches (PyTorch's
  ``momentum=None``), with the number of batches in ``batch_stats/count``.

Every module takes ``use_autodiff``: False (default) calls the op with its hand-derived
``custom_vjp``; True calls the plain-jnp reference in :mod:`jax_batchinhib.reference` and
lets JAX differentiate it. Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian``) does **not** work through a ``custom_vjp``: use ``use_autodiff=True``
when you need it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jax_batchinhib import linen as bnn
  >>> bn = bnn.BatchNorm(momentum=0.9)
  >>> x = jax.random.normal(jax.random.key(0), (8, 3))
  >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
  >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  >>> sorted(updates["batch_stats"])
  ['mean', 'var']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax.nn import initializers

from jax_batchinhib import running
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops.batch_inhib import CORRELATIONS, DENOMINATORS, GUARD_MODES, alpha_shape

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchCenter", "BatchInhib", "BatchNorm", "Dropout", "near_identity_alpha_init"]


# ----------------------------------------------------------------------------- helpers


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


def _where(mdl) -> str:
    name = getattr(mdl, "name", None)
    cls = type(mdl).__name__
    return f"{cls} '{name}'" if name else cls


def merge_flag(where: str, arg: str, attr, call):
    """The mode flag given at construction or at call time (flax's merge_param with an
    error that names the module and the argument)."""
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


def feature_axis(where: str, axis, x) -> int:
    """The feature axis as a non-negative int; tuples of axes are not supported."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(
            f"{where}: axis must be an int (one feature axis; the ops normalize over every "
            f"other axis); got {axis!r}"
        )
    if jnp.ndim(x) < 1:
        raise ValueError(f"{where}: x must have at least one dimension; got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{where}: axis={axis} is out of range for x of shape {S.shape_str(x.shape)}"
        )
    return axis % x.ndim


def check_float_input(where: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{where}: x must be a floating-point array; got dtype {jnp.result_type(x)}"
        )


def out_dtype(dtype, *arrays):
    """flax's dtype policy: ``dtype`` if given, else the promoted dtype of the inputs and
    parameters (float32 parameters make a bfloat16 input's output float32)."""
    return flax_dtypes.canonicalize_dtype(*[a for a in arrays if a is not None], dtype=dtype)


def compute_input(x, out):
    """x in a dtype at least as wide as the output (the op computes in at least
    float32 and returns its input's dtype)."""
    return x.astype(jnp.promote_types(x.dtype, out))


def check_shape(where: str, what: str, value, want, n: int) -> None:
    got = tuple(jnp.shape(value))
    if got != tuple(want):
        raise ValueError(
            f"{where}: {what} has shape {S.shape_str(got)}, but x with {n} features needs "
            f"{S.shape_str(want)}; the variables were made for another input (re-init, or "
            f"give x with the feature count they were made for)"
        )


def _existing(mdl, col, name, want, where, n):
    if mdl.has_variable(col, name):
        check_shape(where, f"{col}/{name}", mdl.get_variable(col, name), want, n)


def _param(mdl, name, init, shape, dtype, where, n):
    _existing(mdl, "params", name, shape, where, n)
    return mdl.param(name, init, shape, dtype)


def _stat(mdl, name, init, shape, where, n):
    _existing(mdl, "batch_stats", name, shape, where, n)
    return mdl.variable("batch_stats", name, init)


def check_mask_arg(where, mask):
    if mask is not None and not (
        jnp.result_type(mask) == jnp.bool_ or jnp.issubdtype(jnp.result_type(mask), jnp.integer)
    ):
        raise TypeError(f"{where}: mask must be a boolean array; got dtype {jnp.result_type(mask)}")


def check_virtual_batch_size_arg(where, v):
    """``virtual_batch_size``: None or an int >= 1 (that it divides the batch is checked
    on the batch, in training mode)."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{where}: virtual_batch_size must be an int >= 1 or None; got {v!r}")
    return v


def training_form_ok(x, axis, mask, axis_name) -> bool:
    """During init, a batch of one value per feature gets the inference form (flax's
    init accepts any batch; our training form refuses a single value)."""
    return mask is not None or axis_name is not None or running.values_per_feature(x, axis) > 1


def check_inhib_options(
    where, rho, epsilon, groups, correlation, denominator, guard, n, guard_mode="absolute"
):
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: groups must be an int >= 1; got {groups!r}")
    if n % groups:
        raise ValueError(
            f"{where}: groups={groups} must divide the number of features N={n} of x; "
            f"choose groups among the divisors of {n}"
        )
    if correlation not in CORRELATIONS:
        raise ValueError(f"{where}: correlation must be one of {CORRELATIONS}; got {correlation!r}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"{where}: denominator must be one of {DENOMINATORS}; got {denominator!r}")
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not rho > 0:
        raise ValueError(f"{where}: rho must be a float > 0; got {rho!r}")
    if guard_mode not in GUARD_MODES:
        raise ValueError(f"{where}: guard_mode must be one of {GUARD_MODES}; got {guard_mode!r}")
    for arg, v in (("epsilon", epsilon), ("guard", 0.0 if guard is None else guard)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise ValueError(f"{where}: {arg} must be a float >= 0; got {v!r}")


# ------------------------------------------------------------------------------ modules


class BatchNorm(nn.Module):
    """Batch normalization (flax.linen.BatchNorm's interface) with a hand-derived VJP.

    Attributes: as :class:`flax.linen.BatchNorm` (``use_running_average``, ``axis``,
    ``momentum``, ``epsilon``, ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``,
    ``bias_init``, ``scale_init``, ``axis_name``, ``axis_index_groups``,
    ``use_fast_variance``, ``force_float32_reductions``), plus:

    - ``momentum``: a float (EMA, flax's meaning) or None (cumulative average over all
      batches, with ``batch_stats/count``).
    - ``unbiased``: store m/(m-1) times the batch variance (True, PyTorch's and seed
      002's) or the biased batch variance (False, flax's).
    - ``use_autodiff``: differentiate the plain-jnp reference instead of using the
      hand-derived VJP (needed for jax.jvp / jacfwd / hessian).
    - ``virtual_batch_size``: ghost batches (Keras's ``virtual_batch_size``): in
      training mode each run of this many examples along the leading axis is normalized
      with its own statistics (it must divide ``x.shape[0]``), and the running
      statistics are updated with the average over the ghost batches of their statistics,
      each unbiased with its own count (``m = virtual_batch_size`` times the positions
      per example). Eval mode ignores it. The same attribute on every module.

    ``use_fast_variance`` is accepted for compatibility and ignored: the op always uses
    the shifted two-pass variance (flax's ``use_fast_variance=False`` up to round-off).
    Statistics are always accumulated in at least float32.
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    unbiased: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalize ``x`` with batch statistics (training) or running ones (eval).

        Args:
          x: the input, features on ``axis``.
          use_running_average: overrides nothing: give it here or at construction.
          mask: boolean, x's shape or x's shape without the feature axis: positions
            counted in the statistics (and in the count m).
        """
        where = _where(self)
        check_float_input(where, x)
        use_ra = merge_flag(
            where, "use_running_average", self.use_running_average, use_running_average
        )
        ax = feature_axis(where, self.axis, x)
        momentum = running.check_momentum(where, self.momentum)
        check_mask_arg(where, mask)
        n = x.shape[ax]
        sdt = running.stats_dtype(self.param_dtype, self.force_float32_reductions)
        ra_mean = _stat(self, "mean", lambda: jnp.zeros((n,), sdt), (n,), where, n)
        ra_var = _stat(self, "var", lambda: jnp.ones((n,), sdt), (n,), where, n)
        state = {"mean": ra_mean.value, "var": ra_var.value}
        if momentum is None:
            ra_count = _stat(self, "count", lambda: jnp.zeros((n,), jnp.int32), (n,), where, n)
            state["count"] = ra_count.value
        scale = bias = None
        if self.use_scale:
            scale = _param(self, "scale", self.scale_init, (n,), self.param_dtype, where, n)
        if self.use_bias:
            bias = _param(self, "bias", self.bias_init, (n,), self.param_dtype, where, n)

        init = self.is_initializing()
        axis_name = None if init else self.axis_name
        if init and not use_ra and not training_form_ok(x, ax, mask, axis_name):
            use_ra = True
        out = out_dtype(self.dtype, x, scale, bias)
        y, new = running.batch_norm_step(
            where,
            compute_input(x, out),
            scale,
            bias,
            state,
            use_running_average=use_ra,
            update_stats=not init,
            momentum=momentum,
            unbiased=self.unbiased,
            epsilon=self.epsilon,
            axis=ax,
            axis_name=axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=check_virtual_batch_size_arg(where, self.virtual_batch_size),
        )
        if not use_ra and not init:
            ra_mean.value = new["mean"]
            ra_var.value = new["var"]
            if momentum is None:
                ra_count.value = new["count"]
        return jnp.asarray(y, out)


class BatchCenter(nn.Module):
    """Batch centering (seed 001's mean-only layer): ``y = x - mean + bias``.

    Training mode subtracts the batch mean and updates the running mean
    (``batch_stats/mean``; with ``momentum=None`` also ``batch_stats/count``); eval mode
    subtracts the running mean. Parameter: ``params/bias`` (when ``use_bias``).
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    bias_init: Initializer = initializers.zeros
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where = _where(self)
        check_float_input(where, x)
        use_ra = merge_flag(
            where, "use_running_average", self.use_running_average, use_running_average
        )
        ax = feature_axis(where, self.axis, x)
        momentum = running.check_momentum(where, self.momentum)
        check_mask_arg(where, mask)
        n = x.shape[ax]
        sdt = running.stats_dtype(self.param_dtype, self.force_float32_reductions)
        ra_mean = _stat(self, "mean", lambda: jnp.zeros((n,), sdt), (n,), where, n)
        state = {"mean": ra_mean.value}
        if momentum is None:
            ra_count = _stat(self, "count", lambda: jnp.zeros((n,), jnp.int32), (n,), where, n)
            state["count"] = ra_count.value
        bias = None
        if self.use_bias:
            bias = _param(self, "bias", self.bias_init, (n,), self.param_dtype, where, n)
        init = self.is_initializing()
        axis_name = None if init else self.axis_name
        if init and not use_ra and not training_form_ok(x, ax, mask, axis_name):
            use_ra = True
        out = out_dtype(self.dtype, x, bias)
        y, new = running.batch_center_step(
            where,
            compute_input(x, out),
            bias,
            state,
            use_running_average=use_ra,
            update_stats=not init,
            momentum=momentum,
            axis=ax,
            axis_name=axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=check_virtual_batch_size_arg(where, self.virtual_batch_size),
        )
        if not use_ra and not init:
            ra_mean.value = new["mean"]
            if momentum is None:
                ra_count.value = new["count"]
        return jnp.asarray(y, out)


class BatchInhib(nn.Module):
    r"""BatchInhib (seed 000): features inhibit each other through their correlation.

    Training mode: ``y = x - x R^T`` with R from the batch covariance (see
    :func:`jax_batchinhib.batch_inhib`), and the running mean, variance and covariance
    are updated like BatchNorm's (``momentum``, ``unbiased``). Eval mode: the fixed
    linear map ``y = x (I - R^T)`` with R from the running covariance
    (:func:`jax_batchinhib.batch_inhib_inference`).

    Variables: ``params/alpha`` of shape ``(N, N)`` (or ``(groups, N/groups, N/groups)``),
    initialized by :func:`near_identity_alpha_init` unless ``alpha_init`` is given;
    ``batch_stats/mean`` (N,), ``var`` (N,), ``cov`` (alpha's shape; initialized to the
    identity, which makes R = 0 before any statistics are seen) and, with
    ``momentum=None``, ``count`` ().
    """

    use_running_average: bool | None = None
    axis: int = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    rho: float = 1.0
    groups: int = 1
    correlation: str = "pearson"
    denominator: str = "signed"
    guard: float | None = None  # None: 1e-3 (absolute) or 0.5 (relative guard_mode)
    guard_mode: str = "absolute"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    alpha_init: Initializer | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None
    force_float32_reductions: bool = True
    unbiased: bool = True
    use_autodiff: bool = False
    virtual_batch_size: int | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where = _where(self)
        check_float_input(where, x)
        use_ra = merge_flag(
            where, "use_running_average", self.use_running_average, use_running_average
        )
        ax = feature_axis(where, self.axis, x)
        momentum = running.check_momentum(where, self.momentum)
        check_mask_arg(where, mask)
        n = x.shape[ax]
        check_inhib_options(
            where, self.rho, self.epsilon, self.groups, self.correlation, self.denominator,
            self.guard, n, self.guard_mode,
        )  # fmt: skip
        ashape = alpha_shape(n, self.groups)
        init_fn = self.alpha_init or near_identity_alpha_init(self.rho)
        alpha = _param(self, "alpha", init_fn, ashape, self.param_dtype, where, n)
        sdt = running.stats_dtype(self.param_dtype, self.force_float32_reductions)
        ra_mean = _stat(self, "mean", lambda: jnp.zeros((n,), sdt), (n,), where, n)
        ra_var = _stat(self, "var", lambda: jnp.ones((n,), sdt), (n,), where, n)
        ra_cov = _stat(self, "cov", lambda: identity_cov(ashape, sdt), ashape, where, n)
        state = {"mean": ra_mean.value, "var": ra_var.value, "cov": ra_cov.value}
        if momentum is None:
            ra_count = _stat(self, "count", lambda: jnp.zeros((), jnp.int32), (), where, n)
            state["count"] = ra_count.value
        init = self.is_initializing()
        axis_name = None if init else self.axis_name
        if init and not use_ra and not training_form_ok(x, ax, mask, axis_name):
            use_ra = True
        out = out_dtype(self.dtype, x, alpha)
        y, new = running.batch_inhib_step(
            where,
            compute_input(x, out),
            alpha,
            state,
            use_running_average=use_ra,
            update_stats=not init,
            momentum=momentum,
            unbiased=self.unbiased,
            axis=ax,
            axis_name=axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=check_virtual_batch_size_arg(where, self.virtual_batch_size),
            **inhib_options(self),
        )
        if not use_ra and not init:
            ra_mean.value = new["mean"]
            ra_var.value = new["var"]
            ra_cov.value = new["cov"]
            if momentum is None:
                ra_count.value = new["count"]
        return jnp.asarray(y, out)


def inhib_options(mdl) -> dict:
    return dict(
        rho=float(mdl.rho),
        epsilon=float(mdl.epsilon),
        groups=mdl.groups,
        correlation=mdl.correlation,
        denominator=mdl.denominator,
        guard=None if mdl.guard is None else float(mdl.guard),
        guard_mode=mdl.guard_mode,
    )


def identity_cov(shape, dtype):
    """The initial running covariance: the identity (per group)."""
    n = shape[-1]
    eye = jnp.eye(n, dtype=dtype)
    return eye if len(shape) == 2 else jnp.broadcast_to(eye, shape)


class Dropout(nn.Module):
    """Inverted dropout (flax.linen.Dropout's interface) with the op's hand-derived VJP.

    The same key draws the same mask as :class:`flax.linen.Dropout`
    (``bernoulli(key, 1 - rate, shape)``); the key comes from the ``rng_collection``
    ('dropout') unless ``rng`` is given. ``broadcast_dims`` must be empty (the op draws
    one mask entry per element).
    """

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    use_autodiff: bool = False

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        where = _where(self)
        check_dropout_rate(where, self.rate, self.broadcast_dims)
        det = merge_flag(where, "deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or det:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return running._impl(self.use_autodiff).dropout(inputs, float(self.rate), rng)


def check_dropout_rate(where, rate, broadcast_dims=()):
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{where}: rate must be a float in [0, 1]; got {rate!r}")
    if tuple(broadcast_dims):
        raise ValueError(
            f"{where}: broadcast_dims must be () (the hand-derived dropout draws one mask "
            f"entry per element); got {tuple(broadcast_dims)!r}. Use flax.linen.Dropout "
            f"for shared masks."
        )
