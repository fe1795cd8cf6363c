"""Dropout's residual choices (key, bit-packed mask, byte mask) and ``broadcast_dims``.

Every rule is ``dx = where(keep, dy / (1 - rate), 0)``, the same arithmetic as autodiff
of the reference, so the VJPs agree exactly: the tolerances below sit near 10x a
round-off that was measured as 0 (float64 and float32).
"""

from __future__ import annotations

import contextlib
import io
import math
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import parallel
from jax_batchinhib import reference as ref
from jax_batchinhib.ops import keep_mask
from jax_batchinhib.testing import check_vjp

RESIDUALS = ("bits", "key", "bytes")
# (shape, broadcast_dims): plain, NHWC spatial dropout (one mask per (N, C)), a negative
# axis, and a size that is not a multiple of 32 (the packed mask's last word is partial).
LAYOUTS = (
    ((6, 40), ()),
    ((2, 4, 5, 3), (1, 2)),
    ((7, 5, 3), (-1,)),
    ((5, 7), (0,)),
)


def _x(shape, dtype):
    return (jax.random.normal(jax.random.key(3), shape, jnp.float32) * 1.5 + 0.3).astype(dtype)


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_dropout_vjp_matches_autodiff(residual, layout):
    shape, dims = layout
    key = jax.random.key(11)
    kw = dict(residual=residual, broadcast_dims=dims)
    with jax.enable_x64(True):
        # measured max rel 0.0 (same arithmetic as autodiff)
        check_vjp(jb.dropout, ref.dropout, _x(shape, jnp.float64), 0.3, key, rtol=1e-15, **kw)
    # measured max rel 0.0
    check_vjp(jb.dropout, ref.dropout, _x(shape, jnp.float32), 0.3, key, rtol=1e-6, **kw)
    # and bitwise: the gradient is dy / (1 - rate) where kept, 0 elsewhere
    x = _x(shape, jnp.float32)
    ct = jax.random.normal(jax.random.key(4), shape)
    g = jax.grad(lambda x: jnp.sum(jb.dropout(x, 0.3, key, **kw) * ct))(x)
    ga = jax.grad(lambda x: jnp.sum(ref.dropout(x, 0.3, key, broadcast_dims=dims) * ct))(x)
    np.testing.assert_array_equal(g, ga)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("rate", (0.3, 0.5))
def test_dropout_equals_flax_for_the_same_key(layout, rate):
    shape, dims = layout
    x = _x(shape, jnp.float32)
    key = jax.random.key(5)
    # flax's rng= argument bypasses make_rng (which would fold the module path in)
    want = nn.Dropout(rate, broadcast_dims=dims, deterministic=False).apply({}, x, rng=key)
    for residual in RESIDUALS:
        got = jb.dropout(x, rate, key, residual=residual, broadcast_dims=dims)
        np.testing.assert_array_equal(got, want)
    # the mask is shared along broadcast_dims: the kept pattern is constant there
    kept = np.asarray(want != 0)
    for d in dims:
        np.testing.assert_array_equal(kept, np.broadcast_to(kept.any(axis=d, keepdims=True), shape))
    # a legacy uint32 key draws the same mask as its typed wrapping
    raw = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(
        jb.dropout(x, rate, raw, broadcast_dims=dims),
        jb.dropout(x, rate, jax.random.wrap_key_data(raw), broadcast_dims=dims),
    )


def _kept_bytes(f, x):
    _, vjp = jax.vjp(f, x)
    leaves = {id(v): v for v in jax.tree.leaves(vjp) if hasattr(v, "nbytes")}
    return sum(int(v.nbytes) for v in leaves.values())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_dropout_kept_bytes(layout):
    shape, dims = layout
    x = _x(shape, jnp.float32)
    key = jax.random.key(0)
    size = math.prod(1 if i in [d % len(shape) for d in dims] else s for i, s in enumerate(shape))

    def kept(residual):
        return _kept_bytes(lambda x: jb.dropout(x, 0.3, key, residual=residual, **bd), x)

    bd = {"broadcast_dims": dims}
    key_bytes = kept("key")
    assert key_bytes <= 16, key_bytes  # the key (8 bytes) and a zero-size dtype carrier
    # bits: one uint32 word per 32 mask entries; bytes: one byte per entry; plus the key
    # (not kept by these two) is absent, so the difference is exactly the mask
    assert kept("bits") == 4 * math.ceil(size / 32), (kept("bits"), size)
    assert kept("bytes") == size, (kept("bytes"), size)
    auto = _kept_bytes(lambda x: ref.dropout(x, 0.3, key, broadcast_dims=dims), x)
    assert auto >= size  # autodiff keeps at least the boolean mask


def test_dropout_bits_roundtrip_at_every_tail_length():
    # sizes 1..70 cover every partial last word; the unpacked mask is the drawn one
    from jax_batchinhib.ops.dropout import _pack, _unpack

    for n in (1, 31, 32, 33, 64, 70):
        keep = keep_mask(jax.random.key(n), 0.4, (n,))
        np.testing.assert_array_equal(_unpack(_pack(keep), (n,)), keep)


@pytest.mark.parametrize(
    "dims, exc, match",
    [
        ((2,), ValueError, r"dropout: broadcast_dims entry 2 is out of range for x with 2 "),
        ((-3,), ValueError, r"dropout: broadcast_dims entry -3 is out of range"),
        ((0, -2), ValueError, r"dropout: broadcast_dims names axis 0 twice; got \(0, -2\)"),
        ((1, 1), ValueError, r"dropout: broadcast_dims names axis 1 twice"),
        ((0.5,), TypeError, r"dropout: broadcast_dims must hold ints; got \(0.5,\)"),
        ((True,), TypeError, r"dropout: broadcast_dims must hold ints"),
        (1, TypeError, r"dropout: broadcast_dims must be a sequence of ints.*got 1"),
    ],
)
def test_dropout_bad_broadcast_dims(dims, exc, match):
    with pytest.raises(exc, match=match):
        jb.dropout(jnp.ones((4, 3)), 0.5, jax.random.key(0), broadcast_dims=dims)


def test_dropout_bad_residual():
    with pytest.raises(ValueError, match=r"dropout: residual must be one of 'bits', 'key', "):
        jb.dropout(jnp.ones((4, 3)), 0.5, jax.random.key(0), residual="mask")


def test_dropout_refuses_a_batch_of_keys_by_name():
    """A batch of keys (or a raw key of the wrong shape) got JAX's own error, which did
    not name dropout; one key per example is jax.vmap over split keys."""
    x = jnp.ones((4, 3))
    keys = jax.random.split(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"dropout: key must be one PRNG key \(a typed key of "
                       r"shape \(\)\); got shape \(4,\)"):  # fmt: skip
        jb.dropout(x, 0.5, keys)
    with pytest.raises(ValueError, match=r"dropout: key must be one PRNG key \(a raw uint32 "):
        jb.dropout(x, 0.5, jnp.zeros((3,), jnp.uint32))
    y = jax.vmap(lambda r, k: jb.dropout(r, 0.5, k))(x, keys)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y[1], jb.dropout(x[1], 0.5, keys[1]))


# ------------------------------------------------------------ flax's arithmetic, bit for bit


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dropout_half_precision_equals_flax_bit_for_bit(dtype):
    """float16/bfloat16: the op divides as flax does, in x's dtype by 1 - rate rounded to
    it (it divided in float32 by the exact 1 - rate: 1 ulp off flax's in many kept
    entries). Called eagerly, and y and dx under jit (the
    cotangent an argument: a constant one lets XLA fold the backward's division). Not
    under an eager jax.vjp: there flax's division runs op by op, a true division, where
    compiled programs (flax's own under jit, and the op's rule) multiply by the
    reciprocal of the constant, so flax differs from itself by 1 ulp, in float32 too."""
    x = _x((8, 40), dtype) * 100
    ct = jax.random.normal(jax.random.key(4), x.shape).astype(dtype)
    key = jax.random.key(5)
    theirs = nn.Dropout(0.3, deterministic=False)

    def flax_dropout(x):
        return theirs.apply({}, x, rng=key)

    def ours(x):
        return jb.dropout(x, 0.3, key)

    def y_and_dx(f):
        def run(x, ct):
            y, vjp = jax.vjp(f, x)
            return y, vjp(ct)[0]

        return jax.jit(run)

    pairs = [(ours(x), flax_dropout(x))]
    pairs += zip(y_and_dx(ours)(x, ct), y_and_dx(flax_dropout)(x, ct), strict=True)
    for got, want in pairs:
        assert got.dtype == want.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16)
        )


# ------------------------------------------------------------ what each residual keeps


def _saved_bytes_per_element(f, x):
    """Bytes of the residuals ``jax.ad_checkpoint.print_saved_residuals`` lists for
    ``f`` at ``x``, per element of ``x``, without the scalars (1 - rate, a key)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, x)
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), re.M):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if shape:
            total += math.prod(shape) * {"bool": 1, "u8": 1, "u32": 4, "f32": 4, "f64": 8}[dtype]
    return total / x.size


def test_dropout_saved_residuals_are_what_the_docstring_says():
    """Per element of a float32 x of 2048 entries (a mask of as many): "bits" 1/8 byte,
    "bytes" 1, "key" nothing input-sized; autodiff of the reference (and of flax's
    dropout) keeps a bool mask and a float32 zero array, 5 bytes (float64: 9). The
    docstring said "bytes" kept as much as autodiff."""
    key = jax.random.key(0)
    x = jnp.ones((64, 32))

    def ours(residual):
        return _saved_bytes_per_element(lambda x: jb.dropout(x, 0.3, key, residual=residual), x)

    assert (ours("bits"), ours("bytes"), ours("key")) == (1 / 8, 1, 0)
    assert _saved_bytes_per_element(lambda x: ref.dropout(x, 0.3, key), x) == 5
    flax = nn.Dropout(0.3, deterministic=False)
    assert _saved_bytes_per_element(lambda x: flax.apply({}, x, rng=key), x) == 5
    with jax.enable_x64(True):
        x64 = jnp.ones((64, 32), jnp.float64)
        assert _saved_bytes_per_element(lambda x: ref.dropout(x, 0.3, key), x64) == 9
    doc = " ".join(jb.dropout.__doc__.split())
    for claim in (
        "``ceil(s / 32)`` words: 1/8 byte an entry",
        '``"bytes"``: the mask as uint8, 1 byte an entry',
        "5 bytes per element of a float32 ``x`` in all (9 for float64)",
    ):
        assert claim in doc, claim


# ------------------------------------------------------------ types and values


@pytest.mark.parametrize(
    "kw, match",
    [
        pytest.param(
            dict(residual=1),
            r"dropout: residual must be one of 'bits', 'key', 'bytes' \(a str\); got 1 \(int\)",
            id="residual=1",
        ),
        pytest.param(
            dict(residual=None),
            r"dropout: residual must be one of .*got None \(NoneType\)",
            id="residual=None",
        ),
        pytest.param(
            dict(broadcast_dims=np.array(0)),
            r"dropout: broadcast_dims must be a sequence of ints",
            id="broadcast_dims=0-d array",
        ),
        pytest.param(
            dict(broadcast_dims=b"\x00"),
            r"dropout: broadcast_dims must be a sequence of ints",
            id="broadcast_dims=bytes",
        ),
        pytest.param(
            dict(key="k"), r"dropout: key must be a PRNG key .*got 'k' \(str\)", id="key=str"
        ),
        pytest.param(
            dict(key=[0, 1]),
            r"dropout: key must be a PRNG key .*got \[0, 1\] \(list\)",
            id="key=list",
        ),
    ],
)
def test_dropout_wrong_type_is_a_type_error(kw, match):
    """A wrong type is a TypeError naming dropout and the argument: residual=1 was a
    ValueError, a 0-d array of broadcast_dims and a str or list key were JAX's own
    errors naming no function, and bytes were taken for axes."""
    kw = {"key": jax.random.key(0), **kw}
    key = kw.pop("key")
    with pytest.raises(TypeError, match=match) as info:
        jb.dropout(jnp.ones((4, 3)), 0.5, key, **kw)
    assert type(info.value) is TypeError


# ------------------------------------------------------------ shard_map(check_vma=True)


def _sharded_dropout_grad(mod, residual, x_spec, check_vma):
    """dx of dropout under shard_map over 4 devices, one key per device."""
    mesh = parallel.make_mesh(4)
    kw = {"residual": residual} if mod is jb else {}

    def grad(x, keys, ct):
        return jax.grad(lambda x: jnp.sum(mod.dropout(x, 0.3, keys[0], **kw) * ct))(x)

    spec = P(parallel.DATA_AXIS)
    f = jax.shard_map(
        grad, mesh=mesh, in_specs=(x_spec, spec, spec), out_specs=x_spec, check_vma=check_vma
    )
    return jax.jit(f)


def test_dropout_under_shard_map_with_per_device_keys_matches_autodiff():
    """x replicated and the key per device: y varies over the devices and so does dy, so
    dx, for an x typed replicated, must be summed over them (autodiff transposes the
    implicit broadcast of x into a psum). check_vma=True raised a type error (a varying
    cotangent for an invariant input); check_vma=False and a sharded x are unchanged."""
    x = _x((4, 6), jnp.float32)
    keys = jax.random.split(jax.random.key(1), 4)
    ct = jax.random.normal(jax.random.key(2), (16, 6))
    for x_spec, xx in ((P(), x), (P(parallel.DATA_AXIS), jnp.tile(x, (4, 1)))):
        for check_vma in (True, False):
            want = _sharded_dropout_grad(ref, None, x_spec, check_vma)(xx, keys, ct)
            for residual in RESIDUALS:
                got = _sharded_dropout_grad(jb, residual, x_spec, check_vma)(xx, keys, ct)
                # autodiff of the reference sums over the devices before it divides by
                # 1 - rate (x is broadcast after its division), the op after: measured
                # 1.2e-7 relative with x replicated, 0 otherwise
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
