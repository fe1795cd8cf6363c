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

from jax_batchinhib import _modules as M
from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops.batch_inhib import alpha_shape
from jax_batchinhib.running import RunningStats

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchCenter", "BatchInhib", "BatchNorm", "Dropout", "near_identity_alpha_init"]

near_identity_alpha_init = M.near_identity_alpha_init


def _param_or_none(use, init, key_fn, shape, dtype):
    if not use:
        return nnx.data(None)
    return nnx.Param(init(key_fn(), shape, dtype))


class _Stats(nnx.Module):
    """The statistics layers' shared body: attributes, statistics, the step."""

    _kind = ""

    def _setup(self, where, num_features, groups=1, **attrs):
        """Store the attributes, check them, create the running statistics; returns N."""
        n = C.num_features(where, num_features)
        self.num_features = n
        for k, v in attrs.items():
            setattr(self, k, v)
        self.momentum = M.check_common(where, self)
        specs = M.stat_specs(self._kind, n, M.stats_dtype(self), self.momentum, groups)
        for name, (_, init_fn) in specs.items():
            setattr(self, name, nnx.BatchStat(init_fn()))
        return n

    def _run(self, x, use_running_average, mask, params, options=None):
        where = type(self).__name__
        ax = M.check_input(where, x, self.axis, mask, self.num_features)
        use_ra = M.first_flag(
            where, "use_running_average", use_running_average, self.use_running_average
        )
        names = [k for k in RunningStats._fields if k in vars(self)]
        state = RunningStats(**{k: getattr(self, k)[...] for k in names})
        y, new = M.apply(
            self._kind, where, self, x, params, state, axis=ax, use_running_average=use_ra,
            update_stats=True, momentum=self.momentum, axis_name=self.axis_name, mask=mask,
            options=options,
        )  # fmt: skip
        if not use_ra:
            for name, value in new.items():
                getattr(self, name)[...] = value
        return y

    @property
    def _stat_names(self) -> tuple[str, ...]:
        """The running statistics this layer keeps, without the batch count."""
        return tuple(k for k in ("mean", "var", "cov") if k in vars(self))

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
    ``use_fast_variance`` selects the op's variance algorithm (as flax's).
    """

    _kind = "batch_norm"

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
        n = self._setup(
            "BatchNorm", num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, axis_name=axis_name,
            axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            force_float32_reductions=force_float32_reductions, unbiased=unbiased,
            use_autodiff=use_autodiff, virtual_batch_size=virtual_batch_size,
        )  # fmt: skip
        self.scale = _param_or_none(use_scale, scale_init, rngs.params, (n,), param_dtype)
        self.bias = _param_or_none(use_bias, bias_init, rngs.params, (n,), param_dtype)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return self._run(x, use_running_average, mask, (scale, bias))


class BatchCenter(_Stats):
    """Batch centering ``y = x - mean + bias`` with a running mean (seed 001)."""

    _kind = "batch_center"

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
        use_fast_variance: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        n = self._setup(
            "BatchCenter", num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions,
            use_fast_variance=use_fast_variance, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size,
        )  # fmt: skip
        self.bias = _param_or_none(use_bias, bias_init, rngs.params, (n,), param_dtype)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        bias = None if self.bias is None else self.bias[...]
        return self._run(x, use_running_average, mask, (bias,))


class BatchInhib(_Stats):
    """BatchInhib (seed 000) with running mean, variance and covariance.

    Same options and variables as :class:`jax_batchinhib.linen.BatchInhib`: parameter
    ``alpha`` (N, N) or (groups, N/groups, N/groups), initialized by
    :func:`near_identity_alpha_init` unless ``alpha_init`` is
    given; statistics ``mean``, ``var``, ``cov`` (and ``count`` with momentum=None).
    Eval mode is the fixed linear map ``y = x (I - R^T)`` from the running covariance.
    """

    _kind = "batch_inhib"

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
        use_fast_variance: bool = True,
        unbiased: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        where = "BatchInhib"
        n = C.num_features(where, num_features)
        self.rho, self.epsilon, self.groups = rho, epsilon, groups
        self.correlation, self.denominator = correlation, denominator
        self.guard, self.guard_mode = guard, guard_mode
        options = M.inhib_options(where, self, n)
        self._setup(
            where, n, options.groups, use_running_average=use_running_average, axis=axis,
            momentum=momentum, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions,
            use_fast_variance=use_fast_variance, unbiased=unbiased, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size,
        )  # fmt: skip
        init = alpha_init or near_identity_alpha_init(options.rho)
        self.alpha = nnx.Param(init(rngs.params(), alpha_shape(n, groups), param_dtype))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        options = M.inhib_options("BatchInhib", self)
        return self._run(x, use_running_average, mask, (self.alpha[...],), options)


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
        M.check_dropout("Dropout", rate, broadcast_dims)
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
        det = M.first_flag(where, "deterministic", deterministic, self.deterministic)
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
        return M.dropout(where, self.rate, self.use_autodiff, inputs, key)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``."""
        if deterministic is not None:
            self.deterministic = deterministic
