"""Shared pieces of the statistics ops: argument checks, masks and counts, float32
accumulation, the shifted two-pass moments, and sums across devices (``axis_name``).

Everything here runs at trace time on shapes, or inside the ops' forward and backward
rules on arrays; nothing here carries a custom rule of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops import _checks as C

Array = jax.Array

#: Matmul precision for the statistics (covariance) and the rules' matmuls. On GPUs the
#: default float32 matmul may run in TF32 (10-bit mantissa); the rules are proved to
#: float32 round-off, so they ask for full precision.
PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Reduce:
    """Static description of a statistics reduction (hashable: a custom_vjp nondiff arg).

    ``axis`` is the (non-negative) feature axis of an ``ndim``-dimensional input; the
    statistics reduce over ``reduce_axes`` (every other axis) and, when ``axis_name`` is
    given, across the devices of that mapped axis.
    """

    ndim: int
    axis: int
    reduce_axes: tuple[int, ...]
    axis_name: Any = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None

    def psum(self, v):
        if self.axis_name is None:
            return v
        return lax.psum(v, self.axis_name, axis_index_groups=self.axis_index_groups)

    def stats_ct(self, ct):
        """Cotangents of the statistics outputs, made global (see ``docs/scaling.md``).

        The statistics are the same on every device. Under ``jax.shard_map`` with
        ``check_vma=True`` (the default) they are typed device-invariant and their
        cotangent arrives already summed over the devices (autodiff transposes the
        implicit broadcast into a psum). Untyped (``check_vma=False``, ``jax.pmap``,
        ``jax.vmap``) each device holds its own part, and autodiff of the reference
        transposes the forward psum into a psum: do the same here.
        """
        if self.axis_name is None or is_typed(self.axis_name):
            return ct
        return self.psum(ct)

    def keep_shape(self, n: int) -> tuple[int, ...]:
        """Shape of a per-feature vector broadcast against the input."""
        return tuple(n if a == self.axis else 1 for a in range(self.ndim))


def _names(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def vma(x) -> frozenset:
    """The mesh axes along which ``x`` varies, as typed by ``jax.shard_map(check_vma=True)``
    (empty outside it, and for every value when the check is off)."""
    aval = jax.typeof(x)
    v = getattr(aval, "vma", None)  # jax <= 0.8 spelling
    if v is None:
        v = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(v)


def is_typed(axis_name) -> bool:
    """Whether the mapped axis ``axis_name`` tracks device variance (shard_map with
    ``check_vma=True``): there ``axis_index`` is typed varying, elsewhere it is not."""
    return bool(vma(lax.axis_index(axis_name)) & set(_names(axis_name)))


def param_ct(ct, primal):
    """A parameter's cotangent, summed over the devices where ``primal`` is replicated.

    The rules sum over this device's rows, so the cotangent varies across the devices
    of ``axis_name``. A parameter passed into ``shard_map(check_vma=True)`` replicated
    (typed invariant) needs an invariant cotangent: the sum over those devices, which is
    what autodiff gives (it transposes the implicit broadcast into a psum). Untyped
    (``check_vma=False``, ``pmap``) both sets are empty and the per-device part is
    returned, as autodiff of the reference does; sum it with ``lax.psum`` yourself.
    """
    if ct is None or primal is None:
        return ct
    extra = vma(ct) - vma(primal)
    if not extra:
        return ct
    return lax.psum(ct, tuple(sorted(extra, key=str)))


def compute_dtype(dtype) -> jnp.dtype:
    """Statistics accumulate in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- checks
# The argument validators live in ``ops/_checks.py``; these names are kept for the ops.

shape_str = C.shape_str


def check_float(fn: str, name: str, x) -> None:
    C.float_array(fn, name, x)


def normalize_axis(fn: str, axis, ndim: int) -> int:
    return C.axis(fn, axis, ndim)


def check_vector(fn: str, name: str, v, n: int) -> None:
    C.vector(fn, name, v, n)


def check_epsilon(fn: str, epsilon, name: str = "epsilon") -> None:
    C.epsilon(fn, epsilon, name)


def check_axis_name(fn: str, axis_name) -> None:
    """Raise a readable error when ``axis_name`` names no mapped axis in scope."""
    if axis_name is None:
        return
    try:
        lax.axis_index(axis_name)
    except NameError as e:
        raise NameError(
            f"{fn}: axis_name={axis_name!r} names no mapped axis in scope. Call {fn} inside "
            f"jax.shard_map / jax.pmap / jax.vmap with axis_name={axis_name!r}, or pass "
            f"axis_name=None (under jax.jit with a sharded batch the statistics are "
            f"global without it). ({e})"
        ) from None


def as_groups(axis_index_groups) -> tuple[tuple[int, ...], ...] | None:
    if axis_index_groups is None:
        return None
    return tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def make_reduce(fn: str, x, axis, axis_name=None, axis_index_groups=None) -> Reduce:
    ndim = jnp.ndim(x)
    ax = C.axis(fn, axis, ndim)
    check_axis_name(fn, axis_name)
    if axis_index_groups is not None and is_typed(axis_name):
        raise NotImplementedError(
            f"{fn}: axis_index_groups={axis_index_groups!r} is not supported by "
            f"jax.shard_map with check_vma=True (JAX's psum refuses it there). Give the mesh "
            f"a second axis and pass axis_name=<the inner axis> (statistics per group of "
            f"devices), or use check_vma=False / jax.pmap."
        )
    red = tuple(a for a in range(ndim) if a != ax)
    return Reduce(ndim, ax, red, axis_name, as_groups(axis_index_groups))


def mask_weights(fn: str, mask, x_shape: Sequence[int], cfg: Reduce, *, rows_only=False):
    """Turn a boolean mask into float weights broadcastable against x.

    Accepted: a mask of x's shape (or broadcastable to it), or a row mask of x's shape
    without the feature axis. With ``rows_only`` the mask may not vary along the feature
    axis (its feature dimension must be 1 or absent).
    """
    if mask is None:
        return None
    x_shape = tuple(x_shape)
    mshape = tuple(jnp.shape(mask))
    row_shape = tuple(s for a, s in enumerate(x_shape) if a != cfg.axis)
    if mshape == row_shape and len(x_shape) > 1 and mshape != x_shape:
        mask = jnp.expand_dims(mask, cfg.axis)
        mshape = tuple(jnp.shape(mask))
    try:
        b = jnp.broadcast_shapes(mshape, x_shape)
    except ValueError:
        b = None
    if b != x_shape:
        raise ValueError(
            f"{fn}: mask must have the shape of x {shape_str(x_shape)}, broadcast to it, or "
            f"be a row mask of shape {shape_str(row_shape)}; got {shape_str(mshape)}"
        )
    if rows_only and len(mshape) == len(x_shape) and mshape[cfg.axis] != 1:
        raise ValueError(
            f"{fn}: mask must select whole rows (the same for every feature): give a row mask "
            f"of shape {shape_str(row_shape)} or a feature dimension of 1; got "
            f"{shape_str(mshape)}"
        )
    C.mask_dtype(fn, mask)
    return mask


def static_count(fn: str, x_shape, cfg: Reduce, mask) -> int:
    """Number of values per feature on this device; refuses one value per feature."""
    m = 1
    for a in cfg.reduce_axes:
        m *= int(x_shape[a])
    if mask is None and cfg.axis_name is None and m <= 1:
        raise ValueError(
            f"{fn}: training-mode statistics need more than one value per feature; got x of "
            f"shape {shape_str(x_shape)}, which has {m} value per feature over axes "
            f"{cfg.reduce_axes}. Use the inference form with running statistics for single "
            f"examples (as torch.nn.BatchNorm refuses a batch of one in training mode)."
        )
    return m


# ----------------------------------------------------------------------------- moments


def weights_array(mask, dtype):
    return None if mask is None else mask.astype(dtype)


def wsum(v, w, axes, keepdims=True):
    """Sum of v (weighted by w if given) over axes."""
    if w is not None:
        v = v * w
    return jnp.sum(v, axis=axes, keepdims=keepdims)


def count(x_shape, w, cfg: Reduce, dtype):
    """Global number of values per feature (keepdims shape), summed across devices."""
    if w is None:
        m = 1
        for a in cfg.reduce_axes:
            m *= int(x_shape[a])
        return cfg.psum(jnp.asarray(m, dtype))
    n = cfg.psum(jnp.sum(jnp.broadcast_to(w, x_shape), axis=cfg.reduce_axes, keepdims=True))
    return n


def shift_of(xf, w, cfg: Reduce, n):
    """A per-feature value close to the data: the first sample, or the (naive) masked mean.

    Subtracting it before the two passes makes ``x - shift`` exact (Sterbenz) when the
    data sit far from zero, so the variance survives a mean of 1e4 with std 1e-2 in
    float32. It is a constant for differentiation.
    """
    if w is None:
        s = xf
        for a in cfg.reduce_axes:
            s = lax.slice_in_dim(s, 0, 1, axis=a)
        if cfg.axis_name is not None:
            s = lax.pmean(s, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
    else:
        s = cfg.psum(wsum(xf, w, cfg.reduce_axes)) / jnp.maximum(n, 1)
    return lax.stop_gradient(s)


def moments(xf, w, cfg: Reduce, n):
    """Shifted two-pass mean and biased variance (keepdims shapes).

    Returns ``(shift, mean_d, var)`` with mean = shift + mean_d, where ``mean_d`` is the
    mean of ``x - shift``; ``(x - shift) - mean_d`` is the accurate centred data.
    """
    nz = jnp.maximum(n, 1)
    s = shift_of(xf, w, cfg, n)
    d = xf - s
    mean_d = cfg.psum(wsum(d, w, cfg.reduce_axes)) / nz
    dc = d - mean_d
    var = cfg.psum(wsum(dc * dc, w, cfg.reduce_axes)) / nz
    return s, mean_d, var
