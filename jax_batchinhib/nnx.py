"""Flax NNX modules: BatchNorm, BatchCenter, BatchInhib, IterNorm, ZCANorm and Dropout.

They follow :class:`flax.nnx.BatchNorm` / :class:`flax.nnx.Dropout`: the feature count
first, ``rngs`` keyword, parameters as :class:`nnx.Param`, running statistics as
:class:`nnx.BatchStat`, and the mode in the attributes ``use_running_average`` /
``deterministic`` so ``model.train()``, ``model.eval()`` and ``nnx.view`` work; a value
given at call time takes precedence over the attribute.

The arithmetic is the ops' (hand-derived VJPs), the running statistics follow
:mod:`jax_batchinhib.running` (``momentum`` float or None, ``unbiased``), exactly as the
linen modules in :mod:`jax_batchinhib.linen` do; the same variables under the same
names. ``use_autodiff=True`` differentiates the plain-jnp reference instead (needed for
pure forward mode: ``jax.jvp`` or ``jax.jacfwd`` of the layer do not go through a
``custom_vjp``; ``jax.hessian``, forward over reverse, works with either).

As :class:`flax.nnx.BatchNorm`, the statistics layers take ``promote_dtype`` (the
function that casts the input, the running statistics and the parameters before the
computation; flax's ``flax.nnx.nn.dtypes.promote_dtype`` by default) and ``*_metadata``
mappings given to each :class:`nnx.Param` (``scale_metadata``, ``bias_metadata``;
``alpha_metadata`` for BatchInhib's ``alpha``), e.g. sharding annotations
(``{"out_sharding": ("model",)}``).

Complex inputs are refused with a TypeError (flax's modules accept them): the ops and
their hand-derived VJPs are written for real floating-point arrays.

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

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax.nn import initializers

from jax_batchinhib import _modules as M
from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops.batch_inhib import alpha_shape
from jax_batchinhib.running import RunningStats

Array = jax.Array
Dtype = Any
Initializer = Any
PromoteDtypeFn = Callable[..., Any]
_NO_METADATA = MappingProxyType({})

__all__ = [
    "BatchCenter",
    "BatchInhib",
    "BatchNorm",
    "Dropout",
    "IterNorm",
    "ZCANorm",
    "near_identity_alpha_init",
]

near_identity_alpha_init = M.near_identity_alpha_init


def _metadata(where: str, name: str, md) -> dict:
    """``*_metadata``: a mapping of str to anything, given to ``nnx.Param`` (flax's
    meaning: e.g. ``{"out_sharding": ("model",)}``)."""
    if not isinstance(md, Mapping) or not all(isinstance(k, str) for k in md):
        raise TypeError(
            f"{where}: {name} must be a mapping of str to metadata values, passed to "
            f"nnx.Param (e.g. {{'out_sharding': ('model',)}}); got {md!r}"
        )
    return dict(md)


def _param_or_none(where, name, use, init, key_fn, shape, dtype, metadata):
    """The parameter ``name`` (``use_<name>`` checked to be a bool, ``<name>_init`` a
    callable), or None when it is not used."""
    if not C.flag(where, f"use_{name}", use):
        return nnx.data(None)
    M.check_initializer(where, f"{name}_init", init)
    return nnx.Param(init(key_fn(), shape, dtype), **metadata)


def _check_promote_dtype(where: str, fn):
    if not callable(fn):
        raise TypeError(
            f"{where}: promote_dtype must be a callable like "
            f"flax.nnx.nn.dtypes.promote_dtype (a tuple of arrays and a dtype= keyword in, "
            f"the tuple of cast arrays out); got {fn!r}"
        )
    return fn


def _check_promoted(where: str, names, args, out) -> None:
    """What ``promote_dtype`` returned: one floating array per array given, same shape,
    None where None was given."""
    want = f"a tuple of {len(args)} values ({', '.join(names)}): floating arrays of the shapes "
    want += "given, None where None was given"
    if not isinstance(out, tuple | list) or len(out) != len(args):
        got = f"a {type(out).__name__}" + (
            f" of length {len(out)}" if isinstance(out, tuple | list) else ""
        )
        raise TypeError(f"{where}: promote_dtype must return {want}; got {got}")
    for name, a, b in zip(names, args, out, strict=True):
        if (a is None) != (b is None):
            raise TypeError(f"{where}: promote_dtype must return {want}; got {b!r} for {name}")
        if a is None:
            continue
        if tuple(jnp.shape(b)) != tuple(jnp.shape(a)):
            raise ValueError(
                f"{where}: promote_dtype must return {want}; {name} has shape "
                f"{tuple(jnp.shape(a))} but came back with shape {tuple(jnp.shape(b))}"
            )
        if not jnp.issubdtype(jnp.result_type(b), jnp.floating):
            raise TypeError(
                f"{where}: promote_dtype must return {want}; {name} came back with dtype "
                f"{jnp.result_type(b)} (the layers compute on real floating-point arrays)"
            )


def _not_narrower(stored, promoted):
    """``promoted``, or ``stored`` where promoting narrowed a floating statistic."""
    if promoted is None or stored is None:
        return promoted
    narrowed = jnp.finfo(promoted.dtype).bits < jnp.finfo(stored.dtype).bits
    return stored if narrowed else promoted


class _Stats(nnx.Module):
    """The statistics layers' shared body: attributes, statistics, the step."""

    _kind = ""

    def _setup(self, where, num_features, groups=1, *, promote_dtype, **attrs):
        """Store the attributes, check them, create the running statistics; returns N."""
        n = C.num_features(where, num_features)
        self.num_features = n
        self.promote_dtype = _check_promote_dtype(where, promote_dtype)
        for k, v in attrs.items():
            setattr(self, k, C.plain(v))
        self.momentum = M.check_common(where, self)
        specs = M.stat_specs(self._kind, n, M.stats_dtype(self), self.momentum, groups)
        for name, (_, init_fn) in specs.items():
            setattr(self, name, nnx.BatchStat(init_fn()))
        return n

    def _promote(self, where, x, stats: dict, params: dict):
        """flax.nnx's ``promote_dtype`` step: ``(x, *stats, *params)`` cast together
        (``dtype=self.dtype``); returns them in the same three groups."""
        args = (x, *stats.values(), *params.values())
        names = ("x", *stats, *params)
        out = tuple(self.promote_dtype(args, dtype=self.dtype))
        _check_promoted(where, names, args, out)
        k = 1 + len(stats)
        return out[0], dict(zip(stats, out[1:k], strict=True)), tuple(out[k:])

    def _run(self, x, use_running_average, mask, params: dict, options=None):
        where = type(self).__name__
        # the attributes again: one set after construction (bn.momentum = 5.0) was used
        # unchecked, and a variance updated with it went negative
        momentum = M.check_common(where, self)
        if (momentum is None) != ("count" in vars(self)):
            raise ValueError(
                f"{where}: momentum was changed between a float and None after "
                f"construction (now {momentum!r}); the cumulative average (None) keeps a "
                f"count statistic made at construction: build a new {where} instead"
            )
        ax = M.check_input(where, x, self.axis, mask, self.num_features)
        if self._kind in M.WHITENING:
            ax = M.single_axis(where, self.axis, ax)
        use_ra = M.first_flag(
            where, "use_running_average", use_running_average, self.use_running_average
        )
        names = [k for k in RunningStats._fields if k in vars(self)]
        stored = {k: getattr(self, k)[...] for k in names}
        # as flax: the input, the statistics and the parameters go through promote_dtype;
        # eval mode uses the promoted statistics, the running update the stored ones.
        # Unlike flax, a statistic promote_dtype would narrow (dtype=float16 or bfloat16)
        # is used as stored: the ops compute in float32 anyway, and a float16 variance or
        # covariance above 65504 is inf (flax.nnx.BatchNorm's eval then returns 0 for that
        # feature, BatchInhib's NaN). The output's dtype is the promoted one either way.
        x, promoted, params = self._promote(
            where, x, {k: stored[k] for k in self._stat_names}, params
        )
        promoted = {k: _not_narrower(stored[k], v) for k, v in promoted.items()}
        state = RunningStats(**({**stored, **promoted} if use_ra else stored))
        y, new = M.apply(
            self._kind, where, self, x, params, state, axis=ax, use_running_average=use_ra,
            update_stats=True, momentum=momentum, axis_name=self.axis_name, mask=mask,
            options=options,
        )  # fmt: skip
        if not use_ra:
            for name, value in new.items():
                getattr(self, name)[...] = value
        return y

    @property
    def _stat_names(self) -> tuple[str, ...]:
        """The running statistics this layer keeps, without the batch count."""
        return tuple(k for k in ("mean", "var", "cov", "whitening_matrix") if k in vars(self))

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view`` (and listed by ``nnx.view_info``).

        Args:
          use_running_average: if True, the stored running statistics are used instead of
            the statistics of the input batch (eval mode); False: training mode.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


class BatchNorm(_Stats):
    """Batch normalization (flax.nnx.BatchNorm's interface) with a hand-derived VJP.

    Arguments as :class:`flax.nnx.BatchNorm` plus ``momentum=None`` (cumulative
    average, with a ``count`` statistic), ``unbiased`` (True: m/(m-1) times the batch
    variance, like PyTorch; False: flax's), ``force_float32_reductions`` (accepted as
    linen's: reductions and statistics are float32 or wider either way),
    ``use_autodiff`` and ``virtual_batch_size`` (ghost batches, as
    :class:`jax_batchinhib.linen.BatchNorm`; also on BatchCenter and BatchInhib).
    ``use_fast_variance`` selects the op's variance algorithm (as flax's). The statistics
    are stored in ``promote_types(param_dtype, float32)`` (as flax.nnx's, float32 by
    default: with float64 inputs pass ``param_dtype=jnp.float64`` to keep them in
    float64), and eval mode never narrows them: where ``dtype`` (through
    ``promote_dtype``) is float16 or bfloat16, flax.nnx.BatchNorm casts the running
    variance to it (inf above 65504 in float16, and that feature's outputs 0), this one
    uses them as stored; the output takes the promoted dtype either way.

    ``axis`` may be a tuple of feature axes, as flax's: ``num_features`` is then the
    product of their sizes and the parameters and statistics are flat vectors of that
    length (flax.nnx's layout), normalized per feature position over every other axis
    (BatchCenter too; BatchInhib flattens them into N features that inhibit each other,
    alpha (N, N)).

    ``promote_dtype`` (flax's meaning): called as
    ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)`` before the computation
    (``scale``/``bias`` None when unused); eval mode normalizes with the promoted
    statistics, training updates the stored ones. ``scale_metadata`` /
    ``bias_metadata``: given to the parameters' :class:`nnx.Param`. Complex ``x`` is
    refused with a TypeError. ``mask`` differs from flax's as
    :class:`jax_batchinhib.linen.BatchNorm` says: a mask of x's shape without the feature
    axes is a row mask, and outputs at masked positions are constants to
    differentiation.

    Args:
      num_features: N, the size of the feature axis (with a tuple ``axis``, the product
        of their sizes).
      use_running_average: eval mode (``model.eval()`` sets it; may be given at call
        time).
      axis, momentum, epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
        scale_init, axis_name, axis_index_groups, use_fast_variance,
        force_float32_reductions, unbiased, use_autodiff, virtual_batch_size: as in
        :class:`jax_batchinhib.linen.BatchNorm`.
      promote_dtype, scale_metadata, bias_metadata: above.
      rngs: the parameters' initialization keys.
    """

    _kind = "batch_norm"

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
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
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        where = "BatchNorm"
        bias_md = _metadata(where, "bias_metadata", bias_metadata)
        scale_md = _metadata(where, "scale_metadata", scale_metadata)
        n = self._setup(
            where, num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
            use_bias=use_bias, use_scale=use_scale, axis_name=axis_name,
            axis_index_groups=axis_index_groups, use_fast_variance=use_fast_variance,
            force_float32_reductions=force_float32_reductions, unbiased=unbiased,
            use_autodiff=use_autodiff, virtual_batch_size=virtual_batch_size,
            promote_dtype=promote_dtype,
        )  # fmt: skip
        self.scale = _param_or_none(
            where, "scale", use_scale, scale_init, rngs.params, (n,), param_dtype, scale_md
        )
        self.bias = _param_or_none(
            where, "bias", use_bias, bias_init, rngs.params, (n,), param_dtype, bias_md
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return self._run(x, use_running_average, mask, {"scale": scale, "bias": bias})


class BatchCenter(_Stats):
    """Batch centering ``y = x - mean + bias`` with a running mean.

    ``promote_dtype`` is called as ``promote_dtype((x, mean, bias), dtype=dtype)``
    (as :class:`BatchNorm`); ``bias_metadata`` is given to the bias's
    :class:`nnx.Param`. Complex ``x`` is refused with a TypeError.

    Args:
      num_features: N, the size of the feature axis (with a tuple ``axis``, the product
        of their sizes).
      use_running_average, axis, momentum, dtype, param_dtype, use_bias, bias_init,
        axis_name, axis_index_groups, force_float32_reductions, use_fast_variance,
        use_autodiff, virtual_batch_size: as in :class:`BatchNorm`.
      promote_dtype, bias_metadata: above.
      rngs: the parameters' initialization keys.
    """

    _kind = "batch_center"

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
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
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        where = "BatchCenter"
        bias_md = _metadata(where, "bias_metadata", bias_metadata)
        n = self._setup(
            where, num_features, use_running_average=use_running_average, axis=axis,
            momentum=momentum, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
            axis_name=axis_name, axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions,
            use_fast_variance=use_fast_variance, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size, promote_dtype=promote_dtype,
        )  # fmt: skip
        self.bias = _param_or_none(
            where, "bias", use_bias, bias_init, rngs.params, (n,), param_dtype, bias_md
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        bias = None if self.bias is None else self.bias[...]
        return self._run(x, use_running_average, mask, {"bias": bias})


class BatchInhib(_Stats):
    """BatchInhib with running mean, variance and covariance.

    Derivation: docs/derivations.md, "3. batch_inhib".

    Same options and variables as :class:`jax_batchinhib.linen.BatchInhib`: parameter
    ``alpha`` (N, N) or (groups, N/groups, N/groups), initialized by
    :func:`near_identity_alpha_init` unless ``alpha_init`` is
    given; statistics ``mean``, ``var``, ``cov`` (and ``count`` with momentum=None).
    Eval mode is the fixed linear map ``y = x (I - R^T)`` from the running covariance.

    ``promote_dtype`` is called as ``promote_dtype((x, mean, var, cov, alpha),
    dtype=dtype)`` (as :class:`BatchNorm`); ``alpha_metadata`` is given to alpha's
    :class:`nnx.Param`. Complex ``x`` is refused with a TypeError.

    ``axis`` may be a tuple of feature axes, as in
    :class:`jax_batchinhib.linen.BatchInhib`: they are flattened (in increasing axis
    order) into N features, alpha is (N, N) and ``mean``, ``var`` are (N,).

    Args:
      num_features: N, the size of the feature axis (with a tuple ``axis``, the product
        of the feature axes' sizes).
      rho, epsilon, groups, correlation, denominator, guard, guard_mode, alpha_init: as
        in :class:`jax_batchinhib.linen.BatchInhib`.
      use_running_average, axis, momentum, dtype, param_dtype, axis_name,
        axis_index_groups, force_float32_reductions, use_fast_variance, unbiased,
        use_autodiff, virtual_batch_size: as in :class:`BatchNorm`.
      promote_dtype, alpha_metadata: above.
      rngs: the parameters' initialization keys.
    """

    _kind = "batch_inhib"

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
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
        use_fast_variance: bool = False,  # two-pass covariance: see ops.batch_inhib
        unbiased: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        alpha_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        where = "BatchInhib"
        alpha_md = _metadata(where, "alpha_metadata", alpha_metadata)
        n = C.num_features(where, num_features)
        self.rho, self.epsilon, self.groups = C.plain(rho), C.plain(epsilon), C.plain(groups)
        self.correlation, self.denominator = correlation, denominator
        self.guard, self.guard_mode = C.plain(guard), guard_mode
        options = M.inhib_options(where, self, n)
        self._setup(
            where, n, options.groups, use_running_average=use_running_average, axis=axis,
            momentum=momentum, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions,
            use_fast_variance=use_fast_variance, unbiased=unbiased, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size, promote_dtype=promote_dtype,
        )  # fmt: skip
        init = alpha_init or near_identity_alpha_init(options.rho)
        M.check_initializer(where, "alpha_init", init)
        self.alpha = nnx.Param(init(rngs.params(), alpha_shape(n, groups), param_dtype), **alpha_md)

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        options = M.inhib_options("BatchInhib", self)
        return self._run(x, use_running_average, mask, {"alpha": self.alpha[...]}, options)


class _Whiten(_Stats):
    """IterNorm / ZCANorm's shared constructor and call."""

    def _build(self, where, num_features, groups, epsilon, iterations, use_scale, use_bias,
               scale_init, bias_init, param_dtype, rngs, scale_metadata, bias_metadata,
               **attrs):  # fmt: skip
        bias_md = _metadata(where, "bias_metadata", bias_metadata)
        scale_md = _metadata(where, "scale_metadata", scale_metadata)
        n = C.num_features(where, num_features)
        self.groups, self.epsilon = C.plain(groups), C.plain(epsilon)
        if iterations is not None:
            self.iterations = C.plain(iterations)
        M.WhitenOptions.checked(where, self._kind, self, n)
        self._setup(where, n, groups, param_dtype=param_dtype, **attrs)
        self.scale = _param_or_none(
            where, "scale", use_scale, scale_init, rngs.params, (n,), param_dtype, scale_md
        )
        self.bias = _param_or_none(
            where, "bias", use_bias, bias_init, rngs.params, (n,), param_dtype, bias_md
        )

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Whiten ``x``; ``mask``: rows (x's shape without the feature axis) counted."""
        where = type(self).__name__
        options = M.WhitenOptions.checked(where, self._kind, self, self.num_features)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return self._run(x, use_running_average, mask, {"scale": scale, "bias": bias}, options)


class IterNorm(_Whiten):
    """IterNorm (Huang et al., CVPR 2019): batch whitening by ``iterations`` Newton steps,
    with a hand-derived VJP. Same options, variables and running statistics as
    :class:`jax_batchinhib.linen.IterNorm` (running mean and running whitening matrix,
    the average of the batch ones; eval mode is one matmul per group)."""

    _kind = "iter_norm"

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        groups: int = 1,
        iterations: int = 5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        force_float32_reductions: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        promote_dtype: Callable = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._build(
            "IterNorm", num_features, groups, epsilon, iterations, use_scale, use_bias,
            scale_init, bias_init, param_dtype, rngs, scale_metadata, bias_metadata,
            use_running_average=use_running_average, axis=axis, momentum=momentum,
            dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size, promote_dtype=promote_dtype,
        )  # fmt: skip


class ZCANorm(_Whiten):
    """ZCA batch whitening, decorrelated batch norm (Huang et al., CVPR 2018), with a
    hand-derived VJP. Same options, variables and running statistics as
    :class:`jax_batchinhib.linen.ZCANorm`."""

    _kind = "zca_norm"

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        groups: int = 1,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = initializers.zeros,
        scale_init: Initializer = initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        force_float32_reductions: bool = True,
        use_autodiff: bool = False,
        virtual_batch_size: int | None = None,
        promote_dtype: Callable = nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = _NO_METADATA,
        scale_metadata: Mapping[str, Any] = _NO_METADATA,
    ):
        self._build(
            "ZCANorm", num_features, groups, epsilon, None, use_scale, use_bias,
            scale_init, bias_init, param_dtype, rngs, scale_metadata, bias_metadata,
            use_running_average=use_running_average, axis=axis, momentum=momentum,
            dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
            force_float32_reductions=force_float32_reductions, use_autodiff=use_autodiff,
            virtual_batch_size=virtual_batch_size, promote_dtype=promote_dtype,
        )  # fmt: skip


class Dropout(nnx.Module):
    """Inverted dropout (flax.nnx.Dropout's interface) with the op's hand-derived VJP.

    Keys come from ``rngs`` (at construction: the ``rng_collection`` stream is forked,
    as flax does; or at call time: Rngs, RngStream or a key). ``broadcast_dims`` (flax's
    meaning): the axes along which one mask entry is shared, given to the op. The same
    key gives :class:`flax.nnx.Dropout`'s mask and output bit for bit, in every dtype
    (the op divides by ``1 - rate`` as flax does, in ``x``'s dtype, and so does the
    reference that ``use_autodiff=True`` runs).

    Args:
      rate: the probability of dropping an entry, a float in [0, 1].
      broadcast_dims: the axes that share one mask entry (above).
      deterministic: True: identity (``model.eval()`` sets it).
      rng_collection: the stream of ``rngs`` the keys come from.
      use_autodiff: autodiff of the reference instead of the op's custom VJP.
      rngs: where the keys come from (or None: given at call time).
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
        self.rate = C.plain(rate)
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
        return M.dropout(where, self.rate, self.use_autodiff, inputs, key, self.broadcast_dims)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view`` (and listed by ``nnx.view_info``).

        Args:
          deterministic: if True, the input is returned unchanged (no dropout); False:
            dropout is applied.
        """
        if deterministic is not None:
            self.deterministic = deterministic
