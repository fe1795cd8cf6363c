"""Dropout's residual choices (key, bit-packed mask, byte mask) and ``broadcast_dims``.

Every rule is ``dx = where(keep, dy / (1 - rate), 0)``, the same arithmetic as autodiff
of the reference, so the VJPs agree exactly: the tolerances below sit near 10x a
round-off that was measured as 0 (float64 and float32).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_batchinhib as jb
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
