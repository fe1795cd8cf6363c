"""Shared pieces of the statistics ops: argument checks, masks and counts, float32
accumulation, the shifted one- and two-pass moments, and sums across devices (``axis_name``).

Everything here runs at trace time on shapes, or inside the ops' forward and backward
rules on arrays; nothing here carries a custom rule of its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import export, lax

from jax_batchinhib.ops import _checks as C

Array = jax.Array

#: Matmul precision for the statistics (covariance) and the rules' matmuls. On GPUs the
#: default float32 matmul may run in TF32 (10-bit mantissa); the rules are proved to
#: float32 round-off, so they ask for full precision.
PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Reduce:
    """Static description of a statistics reduction (hashable: a custom_vjp nondiff arg).

    ``axes`` are the (non-negative, sorted) feature axes of an ``ndim``-dimensional
    input; the statistics reduce over ``reduce_axes`` (every other axis) and, when
    ``axis_name`` is given, across the devices of that mapped axis. Several feature axes
    (flax's tuple ``axis``) make per-feature vectors of the shape of those axes.
    """

    ndim: int
    axes: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    axis_name: Any = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    #: Whether ``varying`` makes the outputs (statistics and y) per member (the ops: their
    #: statistics are differentiable outputs); False for the modules' running averages,
    #: which are not differentiated and stay unbatched under ``jax.vmap``, as flax's
    #: (``nn.vmap`` may broadcast them: ``variable_axes={"batch_stats": None}``).
    member_stats: bool = True
    #: Whether ``axis_name`` is typed (``shard_map`` with ``check_vma=True``), decided
    #: when the forward is traced: the backward rule may be traced where not every name
    #: of a tuple ``axis_name`` is bound (nested vmaps batch it one level at a time).
    typed: bool = False

    @property
    def feature_axes(self) -> tuple[int, ...]:
        return self.axes

    @property
    def axis(self):
        """The feature axis as an ``axis`` argument: an int, or a tuple of several."""
        return self.axes[0] if len(self.axes) == 1 else self.axes

    def matrix(self) -> Reduce:
        """The same reduction of x viewed as an (M, N) matrix (features last), with the
        same axis name, groups and flags."""
        return dataclasses.replace(self, ndim=2, axes=(1,), reduce_axes=(0,))

    def feature_shape(self, x_shape) -> tuple[int, ...]:
        return tuple(C.dim(x_shape[a]) for a in self.axes)

    def psum(self, v):
        if self.axis_name is None:
            return v
        return lax.psum(v, self.axis_name, axis_index_groups=self.axis_index_groups)

    def varying(self, v, *params):
        """The statistics ``v``, made batched wherever their cotangent must arrive per member.

        A custom rule's output that JAX's vmap leaves unbatched receives one cotangent,
        already summed over the members (the transpose of vmap's broadcast), while the
        rule itself is vmapped whenever any residual is batched: each member would then
        add the whole sum, and the gradient come out multiplied by the vmap size. Two
        ways the statistics come out unbatched:

        - under ``jax.vmap(..., axis_name=...)`` they are a psum, whose result is
          unbatched; ``stats_ct`` expects each member's own cotangent, as under ``pmap``;
        - under a plain ``jax.vmap`` of the parameters ``params`` (scale, bias) with ``x``
          shared, they do not depend on the batched inputs.

        The ops pass ``y`` through here too (no ``params``): under
        ``jax.vmap(..., axis_name=...)`` with ``x`` and the parameters shared (unbatched),
        ``y`` would be unbatched, its cotangent the sum over the members, and ``dx``
        unbatched, which vmap takes for the sum over the members where it is one
        member's part (the gradient through the statistics came out divided by the vmap
        size). Batched, every cotangent and ``dx`` are per member, as under ``pmap``.

        Selecting them by a predicate that is batched like the member index and the
        parameters (a select of two equal operands, whatever the predicate) makes them
        batched, so the cotangent arrives per member. XLA removes the select under
        ``jit`` except where the predicate is itself batched by a plain vmap (a select of
        per-feature vectors may remain there). Typed ``shard_map`` keeps their
        device variance: no predicate that would change it (there, a device-varying
        parameter vmapped over with ``x`` shared is not covered: ``docs/scaling.md``).
        """
        if not self.member_stats:
            return v
        preds = []
        if self.axis_name is not None and not self.typed:
            preds.append(lax.axis_index(self.axis_name) >= 0)
        for p in params:
            if p is not None:
                if explicit_spec(p) is None:
                    first = jnp.ravel(p)[:1]
                else:  # a slice of a sharded parameter is refused: reduce it whole
                    first = p
                preds.append(jnp.all(first == first))
        if not preds:
            return v
        pred = functools.reduce(jnp.logical_and, preds)

        def select(a):
            if not vma(pred) <= vma(a):  # typed shard_map: a device-varying parameter
                return a
            if explicit_spec(a) is not None:  # a scalar predicate keeps a's sharding
                return lax.select(pred, a, a)
            return lax.select(jnp.broadcast_to(pred, a.shape), a, a)

        return jax.tree.map(select, v)

    def stats_ct(self, ct):
        """Cotangents of the statistics outputs, made global (see ``docs/scaling.md``).

        The statistics are the same on every device. Under ``jax.shard_map`` with
        ``check_vma=True`` (the default) they are typed device-invariant and their
        cotangent arrives already summed over the devices (autodiff transposes the
        implicit broadcast into a psum). Untyped (``check_vma=False``, ``jax.pmap``,
        ``jax.vmap``, where ``varying`` makes the statistics per member) each device
        holds its own part, and autodiff of the reference transposes the forward psum
        into a psum: do the same here. Without ``member_stats`` (the modules' running
        averages, whose gradient the modules stop) the statistics stay unbatched under
        vmap, where their cotangent arrives summed already: it is taken as it comes
        (psumming it would multiply it by the vmap size, and without ``jit`` raise
        ``NameError``, the unbatched cotangent being outside the vmapped axis).
        """
        if not self.member_stats or self.axis_name is None or self.typed:
            return ct
        return self.psum(ct)

    def keep_shape(self, feat) -> tuple[int, ...]:
        """Shape of a per-feature vector (of shape ``feat``, an int for one feature axis)
        broadcast against the input."""
        feat = (feat,) if isinstance(feat, int) else tuple(feat)
        keep = [1] * self.ndim
        for a, n in zip(self.axes, feat, strict=True):
            keep[a] = n
        return tuple(keep)


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
    want = explicit_spec(primal)
    if want is not None and jnp.shape(ct) == jnp.shape(primal) and explicit_spec(ct) != want:
        # an Explicit mesh types shardings: a scale's cotangent summed from x sharded
        # along its features comes out sharded like them, the scale may be replicated
        ct = jax.sharding.reshard(ct, named(primal, *want))
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


def normalize_axes(fn: str, axis, ndim: int) -> tuple[int, ...]:
    """``axis``, an int or a tuple of distinct ints (several feature axes, as flax's
    ``axis``), as a sorted tuple of non-negative axes."""
    many = isinstance(axis, tuple | list)
    items = tuple(axis) if many else (axis,)
    if many and not items:
        raise ValueError(f"{fn}: axis must be an int or a non-empty tuple of ints; got ()")
    for a in items:
        if not C.is_int(a):
            raise TypeError(f"{fn}: axis must be an int or a tuple of ints; got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: axis {a} is out of range for x with {ndim} dimensions; "
                f"expected an int in [{-ndim}, {ndim - 1}]" + (f" (axis={axis!r})" if many else "")
            )
    out = tuple(sorted(int(a) % ndim for a in items))
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: axis must not repeat an axis; got {axis!r} for x with {ndim} dims")
    if len(out) == ndim:
        raise ValueError(
            f"{fn}: axis={axis!r} names every axis of x ({ndim} dimensions); at least one "
            f"axis must remain to compute statistics over"
        )
    return out


def normalize_axis(fn: str, axis, ndim: int) -> int:
    """A single feature axis, non-negative."""
    return C.axis(fn, axis, ndim)


def check_vector(fn: str, name: str, v, n) -> None:
    """A per-feature vector: shape ``(n,)``, or the feature shape ``n`` (a tuple) of
    several feature axes."""
    if isinstance(n, tuple) and len(n) == 1:
        n = n[0]
    if not isinstance(n, tuple):
        C.vector(fn, name, v, n)
        return
    if v is None:
        return
    check_float(fn, name, v)
    shape = jnp.shape(v)
    if shape != n:
        raise ValueError(
            f"{fn}: {name} must have the feature shape {shape_str(n)} (x's sizes along "
            f"the feature axes); got {shape_str(shape)}"
        )


def check_epsilon(fn: str, epsilon, name: str = "epsilon") -> None:
    C.epsilon(fn, epsilon, name)


def check_fast_variance(fn: str, use_fast_variance) -> bool:
    """``use_fast_variance`` selects the variance algorithm (True: shifted one-pass,
    False: shifted two-pass): a Python bool."""
    return C.flag(fn, "use_fast_variance", use_fast_variance)


def check_axis_name(fn: str, axis_name) -> bool:
    """Raise a readable error when ``axis_name`` names no mapped axis in scope; return
    whether the axis tracks device variance (shard_map with ``check_vma=True``: there
    ``axis_index`` is typed varying, elsewhere it is not; False without ``axis_name``)."""
    if axis_name is None:
        return False
    try:
        index = lax.axis_index(axis_name)
    except NameError as e:
        raise NameError(
            f"{fn}: axis_name={axis_name!r} names no mapped axis in scope. Call {fn} inside "
            f"jax.shard_map / jax.pmap / jax.vmap with axis_name={axis_name!r}, or pass "
            f"axis_name=None (under jax.jit with a sharded batch the statistics are "
            f"global without it). ({e})"
        ) from None
    return bool(vma(index) & set(_names(axis_name)))


def check_groups(fn: str, axis_name, axis_index_groups) -> tuple[tuple[int, ...], ...] | None:
    """``axis_index_groups`` as a tuple of tuples, checked at trace time against the size
    of ``axis_name``: non-empty groups of integer indices that together name every index
    ``0 .. size-1`` of the mapped axis once. (JAX checks only that the indices it is given
    are ``0 .. k-1`` each once; a partial cover then fails in XLA's verifier.) None without
    ``axis_name`` or without groups."""
    if axis_name is None or axis_index_groups is None:
        return None
    try:
        groups = tuple(tuple(g) for g in axis_index_groups)
    except TypeError:
        groups = None
    if groups is None or not all(C.is_int(i) for g in groups for i in g):
        raise TypeError(
            f"{fn}: axis_index_groups must be a sequence of sequences of integer device "
            f"indices, e.g. [[0, 1], [2, 3]]; got {axis_index_groups!r}"
        )
    groups = tuple(tuple(int(i) for i in g) for g in groups)
    size = lax.axis_size(axis_name)
    seen = sorted(i for g in groups for i in g)
    if not groups or not all(groups) or seen != list(range(size)):
        raise ValueError(
            f"{fn}: axis_index_groups must split the {size} indices 0..{size - 1} of "
            f"axis_name={axis_name!r} into non-empty groups, each index in exactly one "
            f"group; got {axis_index_groups!r}"
        )
    return groups


def make_reduce(
    fn: str, x, axis, axis_name=None, axis_index_groups=None, member_stats=True
) -> Reduce:
    ndim = jnp.ndim(x)
    if ndim < 1:
        raise ValueError(f"{fn}: x must have at least one dimension; got a scalar")
    if ndim > 1 or isinstance(axis, tuple | list):
        ax = normalize_axes(fn, axis, ndim)
    else:  # 1-D x: its one axis is the feature axis (the inference forms take it)
        ax = (normalize_axis(fn, axis, ndim),)
    typed = check_axis_name(fn, axis_name)
    if axis_name is None:
        axis_index_groups = None  # as flax: the groups split a named axis, else unused
    elif axis_index_groups is not None and typed:
        raise NotImplementedError(
            f"{fn}: axis_index_groups={axis_index_groups!r} is not supported by "
            f"jax.shard_map with check_vma=True (JAX's psum refuses it there). Give the mesh "
            f"a second axis and pass axis_name=<the inner axis> (statistics per group of "
            f"devices), or use check_vma=False / jax.pmap."
        )
    groups = check_groups(fn, axis_name, axis_index_groups)
    red = tuple(a for a in range(ndim) if a not in ax)
    return Reduce(ndim, ax, red, axis_name, groups, member_stats, typed)


def mask_shape(fn: str, mask, x_shape: Sequence[int], axes: tuple[int, ...]):
    """A mask checked (its dtype, :func:`_checks.mask_dtype`; its shape against x's) and
    given x's rank: a row mask (x's shape without the feature ``axes``) gets size-1
    feature dimensions; any other mask must broadcast to x (flax's reading, leading 1s
    added). A mask of the row shape is always rows, also where it would broadcast to x
    too (a (4,) mask for x of shape (4, 4)): so a padding mask means the same at every
    batch size. flax reads that one square case as a feature mask; spell it (1, 4) for
    that reading here."""
    C.mask_dtype(fn, mask)
    x_shape = tuple(C.dim(s) for s in x_shape)
    mshape = tuple(C.dim(s) for s in jnp.shape(mask))
    ndim = len(x_shape)
    row_shape = tuple(s for a, s in enumerate(x_shape) if a not in axes)
    if ndim > 1 and mshape == row_shape:
        return jnp.reshape(mask, tuple(1 if a in axes else s for a, s in enumerate(x_shape)))
    padded = (1,) * (ndim - len(mshape)) + mshape  # longer than x: broadcasts to no x
    try:
        fits_x = jnp.broadcast_shapes(padded, x_shape) == x_shape
    except ValueError:
        fits_x = False
    if not fits_x:
        raise ValueError(
            f"{fn}: mask must have the shape of x {shape_str(x_shape)}, broadcast to it, or "
            f"be a row mask of shape {shape_str(row_shape)}; got {shape_str(mshape)}"
        )
    return jnp.reshape(mask, padded)


def mask_weights(fn: str, mask, x_shape: Sequence[int], cfg: Reduce, *, rows_only=False):
    """Check a mask and give it x's rank (:func:`mask_shape`).

    Accepted: a mask of x's shape (or broadcastable to it), or a row mask of x's shape
    without the feature axis. With ``rows_only`` the mask may not vary along the feature
    axis (its feature dimension must be 1 or absent).
    """
    if mask is None:
        return None
    C.mask_dtype(fn, mask)  # first: a list has no shape either
    given = tuple(jnp.shape(mask))
    mask = mask_shape(fn, mask, x_shape, cfg.axes)
    if rows_only and any(jnp.shape(mask)[a] != 1 for a in cfg.axes):
        row_shape = tuple(s for a, s in enumerate(x_shape) if a not in cfg.axes)
        raise ValueError(
            f"{fn}: mask must select whole rows (the same for every feature): give a row mask "
            f"of shape {shape_str(row_shape)} or a feature dimension of 1; got "
            f"{shape_str(given)}"
        )
    return mask


def reduced_size(x_shape, cfg: Reduce):
    """Values per feature on this device: an int, or a symbolic dimension expression
    under shape-polymorphic ``jax.export`` (a symbolic batch size)."""
    m = 1
    for a in cfg.reduce_axes:
        m *= x_shape[a]
    return m


def check_some_features(fn: str, x_shape, nfeat) -> None:
    """The decorrelating ops (a covariance of N x N) need N >= 1 features."""
    if not export.is_symbolic_dim(nfeat) and nfeat < 1:
        raise ValueError(
            f"{fn}: x must have at least one feature; got x of shape {shape_str(x_shape)} "
            f"with {nfeat} features"
        )


def check_features_unsharded(fn: str, x, feature_axes) -> None:
    """The decorrelating ops on an Explicit mesh (``jax.sharding.AxisType.Explicit``) take
    x sharded along its rows, not along its features: the covariance couples every pair
    of features, and the typed sharding rules refuse its product of two feature-sharded
    operands. Refused at trace time with what to do instead."""
    spec = explicit_spec(x)
    if spec is None:
        return
    rows = [a for a in range(len(spec)) if a not in feature_axes]
    late = [a for a in rows[1:] if spec[a] is not None]
    several = len(feature_axes) > 1 and any(spec[a] is not None for a in rows)
    if (late or several) and not [a for a in feature_axes if spec[a] is not None]:
        why = (f"x is sharded along axis {late[0]}" if late else
               f"x has several feature axes {tuple(feature_axes)} and sharded rows")  # fmt: skip
        raise NotImplementedError(
            f"{fn}: {why} on an Explicit mesh (PartitionSpec{tuple(spec)}); the op "
            f"reshapes x into rows and features, which the typed reshape allows only with "
            f"one feature axis and the first other axis alone sharded: reshard x "
            f"(jax.sharding.reshard), or move the feature axes last and merge them first"
        )
    sharded = [a for a in feature_axes if spec[a] is not None]
    if sharded:
        rows = [None if a in feature_axes else spec[a] for a in range(len(spec))]
        first = next((a for a in range(len(spec)) if a not in feature_axes), None)
        if first is not None and rows[first] is None:  # the feature's mesh axis on the rows
            rows[first] = spec[sharded[0]]
        raise NotImplementedError(
            f"{fn}: x is sharded along its feature axis {sharded[0]} on an Explicit mesh "
            f"(PartitionSpec{tuple(spec)}); the covariance couples every pair of features, "
            f"so shard the rows instead, e.g. jax.sharding.reshard(x, "
            f"PartitionSpec{tuple(rows)})"
        )


def static_count(fn: str, x_shape, cfg: Reduce, mask) -> int:
    """Number of values per feature on this device; refuses one value per feature (when
    the shape is known: a symbolic batch size is left to the caller of the export), and
    none even with a mask or ``axis_name`` (every device then has none)."""
    m = reduced_size(x_shape, cfg)
    one = mask is None and cfg.axis_name is None
    if not export.is_symbolic_dim(m) and (m == 0 or (one and m <= 1)):
        raise ValueError(
            f"{fn}: training-mode statistics need more than one value per feature; got x of "
            f"shape {shape_str(x_shape)}, which has {m} value{'' if m == 1 else 's'} per "
            f"feature over axes "
            f"{cfg.reduce_axes}. Use the inference form with running statistics for single "
            f"examples (as torch.nn.BatchNorm refuses a batch of one in training mode; "
            f"flax returns zeros). To trace shapes (nnx.eval_shape, nnx.tabulate), pass a "
            f"batch of two or call in eval mode."
        )
    return m


# ----------------------------------------------------------------------------- moments
#
# Masked values are SELECTED away (``jnp.where``), never multiplied by a zero weight:
# padding often holds garbage, and NaN * 0 is NaN. Every place where the data meet the
# mask goes through :func:`select` (see ``docs/derivations.md``, "Masks select").


def mask_bool(mask):
    """A validated mask as booleans (an integer mask counts its nonzero entries)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_outputs_constant(f, mask_x, mask_y, x, *params):
    """``f(x, *params)``, whose masked outputs are constants to differentiation when
    JAX differentiates it (grad of grad differentiates the custom rules' forward): the
    tangent is that of ``f`` at x with its masked positions set to 0, selected to 0 at the
    masked outputs. A NaN or inf at a masked position of x then reaches no derivative, as
    the first-order rules guarantee (docs/derivations.md, "Masks select"); the
    reference does the same with ``stop_gradient``. ``f`` maps each position (or row) of
    x to the same one of the output; ``mask_x`` / ``mask_y`` broadcast to x and to the
    output. Without a mask, ``f`` itself. Costs nothing undifferentiated."""
    if mask_x is None:
        return f(x, *params)
    return _masked_outputs_constant(f, mask_x, mask_y, x, params)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _masked_outputs_constant(f, mask_x, mask_y, x, params):
    return f(x, *params)


@_masked_outputs_constant.defjvp
def _masked_outputs_constant_jvp(f, primals, tangents):
    mask_x, mask_y, x, params = primals
    _, _, dx, dparams = tangents
    xv = select(x, mask_x)
    _, t = jax.jvp(lambda x, *p: f(x, *p), (xv, *params), (dx, *dparams))
    return f(x, *params), select(t, mask_y)


def select(v, mask, fill=0):
    """``v`` where ``mask`` is True and ``fill`` elsewhere (``v`` itself without a mask).

    A select, not a product: a NaN or inf at a masked position does not survive it.
    """
    if mask is None:
        return v
    return jnp.where(mask, v, jnp.asarray(fill, jnp.result_type(v)))


def wsum(v, mask, axes, keepdims=True):
    """Sum of ``v`` over ``axes`` at the positions where ``mask`` is True (all without)."""
    return jnp.sum(select(v, mask), axis=axes, keepdims=keepdims)


def count(x_shape, mask, cfg: Reduce, dtype):
    """Global number of values per feature (keepdims shape), summed across devices.
    Computed from the mask alone, never from the data."""
    if mask is None:
        return cfg.psum(jnp.asarray(reduced_size(x_shape, cfg), dtype))
    w = jnp.broadcast_to(mask, x_shape).astype(dtype)
    return cfg.psum(jnp.sum(w, axis=cfg.reduce_axes, keepdims=True))


def explicit_spec(x):
    """``x``'s PartitionSpec, padded to its rank, where its sharding is part of its type
    (a mesh with an Explicit axis, ``jax.sharding.AxisType.Explicit``); None elsewhere.
    Ops that such a type refuses (a slice of a sharded axis, a gather without an output
    sharding) take another form there; everywhere else the program is unchanged."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    if axis_type is None or axis_type.Explicit not in tuple(types):
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (jnp.ndim(x) - len(spec))


def named(x, *spec):
    """``NamedSharding`` of ``x``'s own mesh with ``spec``: a bare ``PartitionSpec`` as an
    ``out_sharding`` needs a mesh context (``jax.set_mesh``), which a caller that only
    placed its arrays on an Explicit mesh has not entered."""
    return jax.sharding.NamedSharding(
        jax.typeof(x).sharding.mesh, jax.sharding.PartitionSpec(*spec)
    )


def row_sum_kw(a, row_axis: int, out_ndim: int = 3) -> dict:
    """Keyword arguments for an einsum that sums ``a`` over its rows (axis ``row_axis``):
    ``{"out_sharding": replicated}`` where those rows are sharded on an Explicit mesh (the
    sum of a covariance is ambiguous to the typed sharding rules otherwise); ``{}``
    elsewhere."""
    spec = explicit_spec(a)
    if spec is None or spec[row_axis] is None:
        return {}
    # a full-rank spec (every output axis None): the empty one broke vmap's batching
    # rule of the product (jax.hessian, an ensemble of parameters)
    return {"out_sharding": named(a, *(None,) * out_ndim)}


def _first_valid(xf, mask, cfg: Reduce):
    """Per feature, the value at the first position (row-major over the reduced axes)
    where ``mask`` is True, and whether there is one: ``(sample, has)``, keepdims shapes.

    Reads the mask and gathers one value per feature; it does not read the data. The
    search runs over the mask's own shape, not its broadcast to x's: along an axis where
    the mask has size 1 the first valid position has coordinate 0, so a row mask costs
    a search over the rows, not over rows times features (which XLA would also
    constant-fold for seconds when the mask is a constant of the jitted function)."""
    shape = xf.shape
    mask = jnp.reshape(mask, (1,) * (xf.ndim - jnp.ndim(mask)) + jnp.shape(mask))
    feat = tuple(shape[a] for a in cfg.feature_axes)
    mfeat = tuple(mask.shape[a] for a in cfg.feature_axes)  # 1 or the feature's size
    mred = tuple(mask.shape[a] for a in cfg.reduce_axes)  # 1 along broadcast axes
    mt = jnp.transpose(mask, cfg.reduce_axes + cfg.feature_axes).reshape((-1,) + mfeat)
    idx = jnp.argmax(mt, axis=0)  # first True (0 where there is none)
    has = jnp.broadcast_to(jnp.any(mt, axis=0), feat)
    coords = iter(jnp.unravel_index(idx, mred) if mred else ())
    grid = iter(jnp.indices(feat, sparse=True))
    index = tuple(next(grid) if a in cfg.feature_axes else next(coords) for a in range(xf.ndim))
    spec = explicit_spec(xf)
    if spec is None:
        sample = xf[index]
    else:  # an Explicit mesh: the gathered values keep the feature axes' sharding
        out = named(xf, *(spec[a] for a in cfg.feature_axes))
        sample = xf.at[index].get(out_sharding=out)
    sample = jnp.broadcast_to(sample, feat)  # one gathered value per feature
    keep = tuple(shape[a] if a in cfg.feature_axes else 1 for a in range(xf.ndim))
    return jnp.where(has, sample, 0).reshape(keep), has.reshape(keep)


def shift_of(xf, mask, cfg: Reduce):
    """A per-feature value taken from the data: the first sample, with a mask the first
    VALID sample (a masked value is never read); with ``axis_name`` the average of the
    devices' samples (devices with no valid sample left out).

    Subtracting it makes ``x - shift`` small and exact (Sterbenz) when the data sit far
    from zero, so the variance survives a mean of 1e4 with std 1e-2 in float32 (the
    bound is in ``docs/derivations.md``). It is a constant for differentiation.
    """
    if mask is None:
        s = xf
        spec = explicit_spec(xf)
        for a in cfg.reduce_axes:
            if spec is None or spec[a] is None:
                s = lax.slice_in_dim(s, 0, 1, axis=a)
            else:  # a slice of an Explicit-sharded axis is refused; a gather is not
                spec = tuple(None if b == a else spec[b] for b in range(s.ndim))
                at = tuple(
                    jnp.zeros(1, jnp.int32) if b == a else slice(None) for b in range(s.ndim)
                )
                s = s.at[at].get(out_sharding=named(s, *spec))
        if cfg.axis_name is not None:
            s = lax.pmean(s, cfg.axis_name, axis_index_groups=cfg.axis_index_groups)
    else:
        s, has = _first_valid(xf, mask, cfg)
        if cfg.axis_name is not None:
            k = has.astype(s.dtype)
            tot, num = cfg.psum((s * k, k))  # s is finite: it is 0 where has is False
            s = tot / jnp.maximum(num, 1)
    return lax.stop_gradient(s)


def moments(xf, mask, cfg: Reduce, n, fast: bool = True):
    """Shifted mean and biased variance (keepdims shapes), over the positions where
    ``mask`` is True.

    ``fast=True``: one pass, ``Σd`` and ``Σd²`` of ``d = x - shift`` in the same
    reduction, ``var = Σd²/n - (Σd/n)²`` (clamped at 0). ``fast=False``: two passes,
    ``var = Σ(d - mean_d)²/n``. Returns ``(shift, mean_d, var)`` with mean = shift +
    mean_d, where ``mean_d`` is the mean of ``x - shift``; ``(x - shift) - mean_d`` is the
    accurate centred data.
    """
    nz = jnp.maximum(n, 1)
    s = shift_of(xf, mask, cfg)
    d = select(xf - s, mask)
    red = cfg.reduce_axes
    if fast:
        s1, s2 = cfg.psum((jnp.sum(d, red, keepdims=True), jnp.sum(d * d, red, keepdims=True)))
        mean_d = s1 / nz
        var = jnp.maximum(s2 / nz - mean_d * mean_d, 0)
    else:
        mean_d = cfg.psum(jnp.sum(d, red, keepdims=True)) / nz
        dc = select(d - mean_d, mask)
        var = cfg.psum(jnp.sum(dc * dc, red, keepdims=True)) / nz
    return s, mean_d, var
