"""Flax NNX modules: BatchNorm, BatchCenter, BatchInhib and Dropout.

They follow :class:`flax.nnx.BatchNorm` / :class:`flax.nnx.Dropout`: the feature count
first, ``rngs`` keyword, parameters as :class:`nnx.Param`, running statistics as
:class:`nnx.BatchStat`, and the mode in the attributes ``use_running_average`` /
``deterministic`` so ``model.train()``, ``model.eval()`` and ``nnx.view`` work; a value
given at call time takes precedence over the attribute.

The arithmetic is the ops' (hand-derived VJPs), the running statistics follow
:mod:`jax_batchinhib.running` (``momentum`` float or None, ``unbiased``), exactly as the
linen modules in :mod:`jax_batchinhib.linen` do; the same variables under the same
names. ``use_autodiff=True`` differentiates the plain-jnp reference instead (needed for
forward mode: ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` do not go through a
``custom_vjp``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jax_batchinhib import nnx as bnx
  >>> bn = bnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
  >>> y = bn(jax.random.normal(jax.random.key(0), (8, 3)))  # training mode by default
  >>> bn.eval()
  >>> bool(bn.use_running_average)
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.nn import initializers

from jax_batchinhib import linen as _L
from jax_batchinhib import running
from jax_batchinhib.ops.batch_inhib import alpha_shape

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchCenter", "BatchInhib", "BatchNorm", "Dropout"]


def _first(where: str, arg: str, call, attr):
    """Call-time value if given, else the attribute (flax.nnx's precedence)."""
    if call is not None:
        return bool(call)
    if attr is not None:
        return bool(attr)
    raise ValueError(
        f"{where}: {arg} was given nowhere; pass it at construction "
        f"({where}(..., {arg}=True/False)), at call time (layer(x, {arg}=True/False)), or "
        f"set the mode with model.train() / model.eval()"
    )


def _check_features(where: str, num_features, x, axis) -> int:
    ax = _L.feature_axis(where, axis, x)
    if x.shape[ax] != num_features:
        raise ValueError(
            f"{where}: x has {x.shape[ax]} features on axis {axis} (shape {tuple(x.shape)}), "
            f"but the layer was built with num_features={num_features}"
        )
    return ax


def _check_num_features(where: str, num_features) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"{where}: num_features must be an int >= 1; got {num_features!r}")
    return num_features


def _param_or_none(use, init, key_fn, shape, dtype):
    if not use:
        return nnx.data(None)
    return nnx.Param(init(key_fn(), shape, dtype))


class _Stats(nnx.Module):
    """Shared plumbing: read and write the running statistics as a dict."""

    _stat_names: tuple[str, ...] = ()

    def _state(self) -> dict:
        st = {k: getattr(self, k)[...] for k in self._stat_names}
        if self.momentum is None:
            st["count"] = self.count[...]
        return st

    def _write(self, new: dict) -> None:
        for k in self._stat_names:
            getattr(self, k)[...] = new[k]
        if self.momentum is None:
            self.count[...] = new["count"]

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_Stats):
    """Batch normalization (flax.nnx.BatchNorm's interface) with a hand-derived VJP.

    Arguments as :class:`flax.nnx.BatchNorm` plus ``momentum=None`` (cumulative
    average, with a ``count`` statistic), ``unbiased`` (True: m/(m-1) times the batch
    variance, like PyTorch; False: flax's), ``force_float32_reductions`` (statistics
    dtype, as linen), ``use_autodiff`` and ``virtual_batch_size`` (ghost batches, as
    :class:`jax_batchinhib.linen.BatchNorm`; also on BatchCenter and BatchInhib).
    ``use_fast_variance`` is accepted and ignored (the op's variance is two-pass).
    """

    _stat_names = ("mean", "var")

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        force_float32_reductions: bool = True,
        unbiased: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        where = "BatchNorm"
        n = _check_num_features(where, num_features)
        self.momentum = running.check_momentum(where, momentum)
        sdt = running.stats_dtype(param_dtype, force_float32_reductions)
        self.mean = nnx.BatchStat(jnp.zeros((n,), sdt))
        self.var = nnx.BatchStat(jnp.ones((n,), sdt))
        if self.momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((n,), jnp.int32))
        self.scale = _param_or_none(use_scale, scale_init, rngs.params, (n,), param_dtype)
        self.bias = _param_or_none(use_bias, bias_init, rngs.params, (n,), param_dtype)
        self.num_features = n
        self.use_running_average = use_running_average
        self.axis = axis
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.force_float32_reductions = force_float32_reductions
        self.unbiased = unbiased
        self.use_autodiff = use_autodiff
        self.virtual_batch_size = _L.check_virtual_batch_size_arg(where, virtual_batch_size)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where = "BatchNorm"
        _L.check_float_input(where, x)
        use_ra = _first(where, "use_running_average", use_running_average, self.use_running_average)
        ax = _check_features(where, self.num_features, x, self.axis)
        _L.check_mask_arg(where, mask)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        out = _L.out_dtype(self.dtype, x, scale, bias)
        y, new = running.batch_norm_step(
            where,
            _L.compute_input(x, out),
            scale,
            bias,
            self._state(),
            use_running_average=use_ra,
            update_stats=True,
            momentum=self.momentum,
            unbiased=self.unbiased,
            epsilon=self.epsilon,
            axis=ax,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=self.virtual_batch_size,
        )
        if not use_ra:
            self._write(new)
        return jnp.asarray(y, out)


class BatchCenter(_Stats):
    """Batch centering ``y = x - mean + bias`` with a running mean (seed 001)."""

    _stat_names = ("mean",)

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        bias_init: Initializer = initializers.zeros,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        force_float32_reductions: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        where = "BatchCenter"
        n = _check_num_features(where, num_features)
        self.momentum = running.check_momentum(where, momentum)
        sdt = running.stats_dtype(param_dtype, force_float32_reductions)
        self.mean = nnx.BatchStat(jnp.zeros((n,), sdt))
        if self.momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((n,), jnp.int32))
        self.bias = _param_or_none(use_bias, bias_init, rngs.params, (n,), param_dtype)
        self.num_features = n
        self.use_running_average = use_running_average
        self.axis = axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.force_float32_reductions = force_float32_reductions
        self.use_autodiff = use_autodiff
        self.virtual_batch_size = _L.check_virtual_batch_size_arg(where, virtual_batch_size)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where = "BatchCenter"
        _L.check_float_input(where, x)
        use_ra = _first(where, "use_running_average", use_running_average, self.use_running_average)
        ax = _check_features(where, self.num_features, x, self.axis)
        _L.check_mask_arg(where, mask)
        bias = None if self.bias is None else self.bias[...]
        out = _L.out_dtype(self.dtype, x, bias)
        y, new = running.batch_center_step(
            where,
            _L.compute_input(x, out),
            bias,
            self._state(),
            use_running_average=use_ra,
            update_stats=True,
            momentum=self.momentum,
            axis=ax,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=self.virtual_batch_size,
        )
        if not use_ra:
            self._write(new)
        return jnp.asarray(y, out)


class BatchInhib(_Stats):
    """BatchInhib (seed 000) with running mean, variance and covariance.

    Same options and variables as :class:`jax_batchinhib.linen.BatchInhib`: parameter
    ``alpha`` (N, N) or (groups, N/groups, N/groups), initialized by
    :func:`jax_batchinhib.linen.near_identity_alpha_init` unless ``alpha_init`` is
    given; statistics ``mean``, ``var``, ``cov`` (and ``count`` with momentum=None).
    Eval mode is the fixed linear map ``y = x (I - R^T)`` from the running covariance.
    """

    _stat_names = ("mean", "var", "cov")

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        rho: float = 1.0,
        groups: int = 1,
        correlation: str = "pearson",
        denominator: str = "signed",
        guard: float | None = None,
        guard_mode: str = "absolute",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        alpha_init: Initializer | None = None,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        force_float32_reductions: bool = True,
        unbiased: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        where = "BatchInhib"
        n = _check_num_features(where, num_features)
        _L.check_inhib_options(
            where, rho, epsilon, groups, correlation, denominator, guard, n, guard_mode
        )
        self.momentum = running.check_momentum(where, momentum)
        ashape = alpha_shape(n, groups)
        sdt = running.stats_dtype(param_dtype, force_float32_reductions)
        self.mean = nnx.BatchStat(jnp.zeros((n,), sdt))
        self.var = nnx.BatchStat(jnp.ones((n,), sdt))
        self.cov = nnx.BatchStat(_L.identity_cov(ashape, sdt))
        if self.momentum is None:
            self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
        init = alpha_init or _L.near_identity_alpha_init(rho)
        self.alpha = nnx.Param(init(rngs.params(), ashape, param_dtype))
        self.num_features = n
        self.use_running_average = use_running_average
        self.axis = axis
        self.epsilon = epsilon
        self.rho = rho
        self.groups = groups
        self.correlation = correlation
        self.denominator = denominator
        self.guard = guard
        self.guard_mode = guard_mode
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.force_float32_reductions = force_float32_reductions
        self.unbiased = unbiased
        self.use_autodiff = use_autodiff
        self.virtual_batch_size = _L.check_virtual_batch_size_arg(where, virtual_batch_size)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        where = "BatchInhib"
        _L.check_float_input(where, x)
        use_ra = _first(where, "use_running_average", use_running_average, self.use_running_average)
        ax = _check_features(where, self.num_features, x, self.axis)
        _L.check_mask_arg(where, mask)
        alpha = self.alpha[...]
        out = _L.out_dtype(self.dtype, x, alpha)
        y, new = running.batch_inhib_step(
            where,
            _L.compute_input(x, out),
            alpha,
            self._state(),
            use_running_average=use_ra,
            update_stats=True,
            momentum=self.momentum,
            unbiased=self.unbiased,
            axis=ax,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            mask=mask,
            use_autodiff=self.use_autodiff,
            virtual_batch_size=self.virtual_batch_size,
            **_L.inhib_options(self),
        )
        if not use_ra:
            self._write(new)
        return jnp.asarray(y, out)


class Dropout(nnx.Module):
    """Inverted dropout (flax.nnx.Dropout's interface) with the op's hand-derived VJP.

    Keys come from ``rngs`` (at construction: the ``rng_collection`` stream is forked,
    as flax does; or at call time: Rngs, RngStream or a key). ``broadcast_dims`` must be
    empty.
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        use_autodiff: bool = False,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        _L.check_dropout_rate("Dropout", rate, broadcast_dims)
        self.rate = rate
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.use_autodiff = use_autodiff
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        elif rngs is None:
            self.rngs = nnx.data(None)
        else:
            raise TypeError(f"Dropout: rngs must be nnx.Rngs, nnx.RngStream or None; got {rngs!r}")

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        where = "Dropout"
        det = _first(where, "deterministic", deterministic, self.deterministic)
        if self.rate == 0.0 or det:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        elif rngs is None:
            raise ValueError(
                f"{where}: deterministic is False but no rngs were given, neither at "
                f"construction (Dropout(rate, rngs=nnx.Rngs(dropout=0))) nor at call time"
            )
        else:
            raise TypeError(
                f"{where}: rngs must be nnx.Rngs, nnx.RngStream or a key; got {type(rngs)}"
            )
        return running._impl(self.use_autodiff).dropout(inputs, float(self.rate), key)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``."""
        if deterministic is not None:
            self.deterministic = deterministic
