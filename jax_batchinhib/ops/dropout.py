"""Inverted dropout with a hand-derived VJP that keeps the key, a bit-packed mask or a
byte mask, and an optional mask shared along ``broadcast_dims`` (as flax.linen.Dropout)."""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import export

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S

#: What the backward keeps (see :func:`dropout`).
RESIDUALS = ("bits", "key", "bytes")


def _check_rate(fn, rate):
    return C.rate(fn, rate)


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    """The shape of a raw uint32 key of the default PRNG implementation ``impl`` (one
    abstract evaluation per implementation, not per trace: it costs about 0.6 ms)."""
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def _check_key(fn, key):
    if key is None:
        raise ValueError(f"{fn}: key is required for rate in (0, 1); got None")
    try:
        dtype = jnp.result_type(key)
    except TypeError:  # not an array (a str, a list): JAX's own error names no function
        raise TypeError(
            f"{fn}: key must be a PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)); "
            f"got {key!r} ({type(key).__name__})"
        ) from None
    if not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32):
        raise TypeError(
            f"{fn}: key must be a PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)); "
            f"got an array of dtype {dtype}"
        )
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    want = () if typed else _raw_key_shape(jax.config.jax_default_prng_impl)
    if tuple(jnp.shape(key)) != tuple(want):
        kind = "a typed key of shape ()" if typed else f"a raw uint32 key of shape {want}"
        raise ValueError(
            f"{fn}: key must be one PRNG key ({kind}); got shape "
            f"{C.shape_str(jnp.shape(key))}. For one mask per example, jax.vmap dropout "
            f"over split keys."
        )


def _check_residual(fn, residual):
    choices = ", ".join(map(repr, RESIDUALS))
    if not isinstance(residual, str):
        raise TypeError(
            f"{fn}: residual must be one of {choices} (a str); got {residual!r} "
            f"({type(residual).__name__})"
        )
    if residual not in RESIDUALS:
        raise ValueError(f"{fn}: residual must be one of {choices}; got {residual!r}")
    return residual


def check_broadcast_dims(fn: str, broadcast_dims, ndim: int) -> tuple[int, ...]:
    """``broadcast_dims`` as a sorted tuple of non-negative axes of an ``ndim``-array.

    Raises a ValueError/TypeError naming ``fn`` for a non-sequence, a non-int entry, an
    axis out of ``[-ndim, ndim)`` or the same axis twice (``0`` and ``-ndim`` included).

    Args:
      fn: the caller's name, for the error.
      broadcast_dims: the value to check.
      ndim: the number of dimensions of ``x``.

    Returns:
      The axes, non-negative and sorted.
    """
    dims = None
    # a str or bytes iterates, but over characters or bytes, not axes
    if not isinstance(broadcast_dims, int | str | bytes):
        try:
            dims = tuple(broadcast_dims)
        except TypeError:  # not iterable, or a 0-d array
            pass
    if dims is None:
        raise TypeError(
            f"{fn}: broadcast_dims must be a sequence of ints (the axes that share one mask); "
            f"got {broadcast_dims!r}"
        )
    out = []
    for d in dims:
        bad = isinstance(d, bool | jnp.bool_)
        if not bad and not isinstance(d, int):
            try:
                d = operator.index(d)
            except TypeError:
                bad = True
        if bad:
            raise TypeError(f"{fn}: broadcast_dims must hold ints; got {dims!r} (entry {d!r})")
        if not -ndim <= d < ndim:
            raise ValueError(
                f"{fn}: broadcast_dims entry {d} is out of range for x with {ndim} "
                f"dimensions; expected ints in [{-ndim}, {ndim - 1}]; got {dims!r}"
            )
        a = d % ndim
        if a in out:
            raise ValueError(
                f"{fn}: broadcast_dims names axis {a} twice; got {dims!r} for x with {ndim} "
                f"dimensions"
            )
        out.append(a)
    return tuple(sorted(out))


def mask_shape(shape, broadcast_dims=()) -> tuple[int, ...]:
    """The shape the mask is drawn at: ``shape`` with 1 on ``broadcast_dims``.

    Args:
      shape: the shape of ``x``.
      broadcast_dims: non-negative axes that share one mask entry.

    Returns:
      The mask's shape, a tuple of ints.
    """
    return tuple(1 if i in broadcast_dims else C.dim(s) for i, s in enumerate(shape))


def keep_mask(key, rate: float, shape, broadcast_dims=()):
    """The boolean keep-mask that :func:`dropout` draws for ``key``, ``rate`` and ``shape``.

    Drawn as :class:`flax.linen.Dropout` draws it: ``bernoulli(key, 1 - rate, s)`` with
    ``s`` = ``shape`` with 1 on ``broadcast_dims`` (non-negative axes), so it has shape
    ``s`` and broadcasts against ``shape``.

    Args:
      key: a PRNG key.
      rate: the probability of dropping an entry.
      shape: the shape of the array the mask is for.
      broadcast_dims: non-negative axes that share one mask entry.

    Returns:
      A boolean array of shape ``mask_shape(shape, broadcast_dims)``, True where kept.
    """
    return jax.random.bernoulli(key, 1.0 - rate, mask_shape(shape, broadcast_dims))


def dropout(x, rate: float, key, *, residual: str = "bits", broadcast_dims=()):
    r"""Inverted dropout: :math:`y = x \odot M`, :math:`M_j = [r_j > p]/(1-p)`.

    Backward: :math:`dx = dy \odot M` (the mask is the VJP's only input). With
    ``broadcast_dims`` (spatial dropout), one mask entry is shared along those axes: the
    mask is drawn at ``x.shape`` with 1 on ``broadcast_dims`` and broadcast, and the same
    formulas hold with :math:`M` broadcast (no reduction: each element of ``dx`` has its
    own ``dy``). For the same key the output equals :class:`flax.linen.Dropout`'s bit for
    bit, in every dtype: the same mask (``bernoulli(key, 1 - rate, mask_shape)``) and the
    same arithmetic, ``x / (1 - rate)`` where kept, divided in ``x``'s dtype by ``1 - rate``
    rounded to it (in bfloat16, rate 0.3 divides by 0.69921875); ``dx`` equals autodiff
    of flax's dropout bit for bit. (Where XLA compiles both alike: under ``jax.jit``, or
    called eagerly. Under an eager ``jax.vjp`` flax's division runs op by op, a true
    division, where a compiled one multiplies by the reciprocal of the constant: flax's
    output there differs from its own jitted output by up to 1 ulp.) Under
    ``jax.shard_map`` with a per-device key and ``x`` replicated, ``dx`` is summed over
    the devices, as autodiff's is.

    What the backward keeps (``residual``), for a mask of ``s`` entries (``x.size``, or
    fewer with ``broadcast_dims``):

    * ``"bits"`` (default): the keep-mask packed 32 to a uint32 word, ``ceil(s / 32)``
      words: 1/8 byte an entry. The backward unpacks it (a shift and an and per element).
    * ``"key"``: only the key (8 bytes for the default threefry key); the backward draws
      the mask again from it (pays the random-number generator twice, keeps nothing
      input-sized).
    * ``"bytes"``: the mask as uint8, 1 byte an entry.

    Autodiff of ``where(mask, x / (1 - rate), 0)`` (flax's dropout; ``use_autodiff`` in
    the modules) keeps more, as ``jax.ad_checkpoint.print_saved_residuals`` lists and
    ``jax.vjp`` holds: the boolean mask broadcast to ``x``'s shape (1 byte per element of
    ``x``, even with ``broadcast_dims``) and zeros of the dtype of the select for its
    transpose, 5 bytes per element of a float32 ``x`` in all (9 for float64). Under
    ``jax.jit`` XLA may fold those zeros (a broadcast constant) into the backward, leaving
    the 1-byte mask: ``"bits"`` keeps 1/8 of it, ``"bytes"`` as much.

    ``rate=0`` returns ``x``; ``rate=1`` returns zeros with a zero (not NaN) gradient.
    ``benchmarks/notes.md`` has the measured time of each residual against autodiff.

    Args:
      x: a floating-point array.
      rate: the probability of dropping an element, a Python float in [0, 1].
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      residual: ``"bits"``, ``"key"`` or ``"bytes"`` (above).
      broadcast_dims: axes of ``x`` that share one mask entry (ints, negative allowed,
        no repeats); ``()`` draws one entry per element.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import dropout
      >>> y = dropout(jnp.ones((2, 4)), 0.5, jax.random.key(0))
      >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
      True
      >>> y = dropout(jnp.ones((2, 4)), 0.5, jax.random.key(0), broadcast_dims=(0,))
      >>> bool((y[0] == y[1]).all())
      True
    """
    fn = "dropout"
    S.check_float(fn, "x", x)
    rate = _check_rate(fn, rate)
    residual = _check_residual(fn, residual)
    dims = check_broadcast_dims(fn, broadcast_dims, jnp.ndim(x))
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    _check_key(fn, key)
    return _dropout(rate, residual, dims, x, key)


def _apply(rate, keep, v, dtype):
    """``where(keep, v / (1 - rate), 0)`` in ``dtype``, as flax.linen.Dropout computes it:
    ``1 - rate`` rounded to ``dtype``, then divided in ``dtype`` (bit-equal to flax in
    every dtype; in float16/bfloat16 the kept values are ``x / fl(1 - rate)``)."""
    v = v.astype(dtype) / jnp.asarray(1.0 - rate, dtype)
    return jnp.where(keep, v, jnp.zeros((), dtype))


def _pack(keep):
    """A boolean array as ``ceil(size / 32)`` uint32 words, bit ``i`` of word ``w`` holding
    element ``32 w + i`` of the flattened array."""
    flat = keep.reshape(-1)
    words = (flat.size + 31) // 32
    pad = 32 * words - flat.size  # written so, a symbolic size (jax.export) cancels out
    if export.is_symbolic_dim(pad) or pad:
        flat = jnp.pad(flat, (0, pad))
    bits = flat.reshape(words, 32).astype(jnp.uint32) << jnp.arange(32, dtype=jnp.uint32)
    return jnp.sum(bits, axis=1, dtype=jnp.uint32)


def _unpack(words, shape):
    size = math.prod(shape)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(-1)[:size].reshape(shape).astype(bool)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dropout(rate, residual, dims, x, key):
    return _apply(rate, keep_mask(key, rate, x.shape, dims), x, x.dtype)


def _dropout_fwd(rate, residual, dims, x, key):
    keep = keep_mask(key, rate, x.shape, dims)
    y = _apply(rate, keep, x, x.dtype)
    # A zero-size array carries x's dtype (dy has x's shape) and, under
    # shard_map(check_vma=True), the mesh axes x varies over (zeros_like keeps them; the
    # same jaxpr as jnp.zeros outside shard_map): the backward sums dx over the others.
    like = jnp.zeros_like(x, shape=(0,))
    if residual == "key":
        return y, (like, key)
    if residual == "bytes":
        return y, (like, keep.astype(jnp.uint8))
    return y, (like, _pack(keep))


def _dropout_bwd(rate, residual, dims, res, dy):
    x0, kept = res
    shape = mask_shape(dy.shape, dims)
    if residual == "key":
        keep = keep_mask(kept, rate, dy.shape, dims)
    elif residual == "bytes":
        keep = kept.astype(bool)
    else:
        keep = _unpack(kept, shape)
    # x replicated over a mesh axis that dy varies over (a per-device key): dx is the sum
    # over that axis, as autodiff's transpose of the implicit broadcast of x gives.
    return S.param_ct(_apply(rate, keep, dy, x0.dtype), x0), None


_dropout.defvjp(_dropout_fwd, _dropout_bwd)
