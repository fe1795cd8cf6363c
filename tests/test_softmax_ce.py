"""softmax_cross_entropy's two residual paths against autodiff of the reference.

With only the logits differentiated (the usual loss), the forward keeps ``exp(z - max)``
and ``sum(t) / sum(exp)`` and the backward has no exp; with the labels differentiated
too, or low-precision logits, it keeps the logits and the log-sum-exp. Tolerances: the
module default of ``check_vjp`` (1e-10 float64, 1e-4 float32, measured below).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import parallel
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp


def _data(shape, dtype, soft=False):
    k1, k2 = jax.random.split(jax.random.key(0))
    z = 3 * jax.random.normal(k1, shape, jnp.float32)
    if soft:
        t = jax.nn.softmax(jax.random.normal(k2, shape), axis=-1) * 0.9  # rows sum to 0.9
    else:
        t = jax.nn.one_hot(jax.random.randint(k2, shape[:-1], 0, shape[-1]), shape[-1])
    return z.astype(dtype), t.astype(dtype)


@pytest.mark.parametrize("soft", (False, True))
@pytest.mark.parametrize("argnums", ((0,), (0, 1)), ids=("logits", "logits+labels"))
def test_sce_vjp_both_paths(argnums, soft):
    with jax.enable_x64(True):
        z, t = _data((6, 9), jnp.float64, soft)
        # measured max rel 4e-16 (logits+labels path), 1.2e-16 (probabilities path)
        check_vjp(jb.softmax_cross_entropy, ref.softmax_cross_entropy, z, t, argnums=argnums)
    z, t = _data((6, 9), jnp.float32, soft)
    # measured max rel 2.7e-7 (logits+labels path), 9e-8 (probabilities path)
    check_vjp(jb.softmax_cross_entropy, ref.softmax_cross_entropy, z, t, argnums=argnums)
    # a feature axis that is not the last
    check_vjp(
        jb.softmax_cross_entropy, ref.softmax_cross_entropy, z.T, t.T, argnums=argnums, axis=0
    )


def test_sce_bfloat16_logits_grad():
    z, t = _data((6, 9), jnp.bfloat16)
    # measured max rel 0.0 here (both round to the same bfloat16); tolerance 2^-6 by dtype
    check_vjp(jb.softmax_cross_entropy, ref.softmax_cross_entropy, z, t, argnums=(0,))


def _count_exp(jaxpr):
    return len(re.findall(r"= exp ", str(jaxpr)))


def test_sce_logits_grad_has_one_exp():
    # value_and_grad w.r.t. the logits: one exp (the forward's), none in the backward;
    # with the labels differentiated too the backward recomputes it (two).
    z, t = _data((4, 5), jnp.float32)

    def loss(z, t):
        return jnp.sum(jb.softmax_cross_entropy(z, t))

    one = jax.make_jaxpr(jax.value_and_grad(loss))(z, t)
    two = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(z, t)
    assert (_count_exp(one), _count_exp(two)) == (1, 2)
    g1 = jax.grad(loss)(z, t)
    g2 = jax.grad(loss, argnums=(0, 1))(z, t)[0]
    np.testing.assert_allclose(g1, g2, rtol=0, atol=1e-6)  # measured 1.2e-7


def test_integer_label_sce_keeps_what_its_backward_needs():
    # float32 logits: one exp (the forward's) and no (M, C) one-hot among the residuals;
    # bfloat16 logits: the logits are kept and the backward recomputes the exp (two).
    f = jb.softmax_cross_entropy_with_integer_labels
    z, _ = _data((4, 5), jnp.float32)
    y = jnp.array([0, 4, 2, 1])

    def loss(z):
        return jnp.sum(f(z, y))

    assert _count_exp(jax.make_jaxpr(jax.value_and_grad(loss))(z)) == 1
    assert _count_exp(jax.make_jaxpr(jax.value_and_grad(loss))(z.astype(jnp.bfloat16))) == 2
    _, vjp = jax.vjp(lambda z: f(z, y), z)
    kept = sorted((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(vjp))
    assert kept == [((4,), "int32"), ((4, 1), "float32"), ((4, 5), "float32")], kept


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16"])
def test_integer_labels_of_a_narrow_dtype_give_the_int32_gradient(dtype):
    """300 rows, more than uint8 or int8 can index: the backward's row indices are int32
    whatever the labels' dtype (they wrapped past 255 in uint8, putting -g on the wrong
    rows, and overflowed int8). The same dz as int32 labels, exactly (the same program),
    and optax's to float32 round-off (another program: the tolerance of
    tests/test_ops.py's comparison with optax, measured 2.4e-7 there)."""
    import optax

    z = jax.random.normal(jax.random.key(0), (300, 4))
    lab = jnp.arange(300) % 4

    def grad(f, labels):
        return jax.grad(lambda z: f(z, labels).sum())(z)

    want = grad(jb.softmax_cross_entropy_with_integer_labels, lab)
    got = grad(jb.softmax_cross_entropy_with_integer_labels, lab.astype(dtype))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        got,
        grad(optax.softmax_cross_entropy_with_integer_labels, lab.astype(dtype)),
        rtol=1e-5,
        atol=1e-6,
    )


# ------------------------------------------------------------ argument checks

_SCE_INT = jb.softmax_cross_entropy_with_integer_labels
_CALLS = {
    "softmax": lambda z, axis: jb.softmax(z, axis=axis),
    "softmax_cross_entropy": lambda z, axis: jb.softmax_cross_entropy(z, z, axis=axis),
    "softmax_cross_entropy_with_integer_labels": lambda z, axis: _SCE_INT(
        z, jnp.zeros(np.delete(z.shape, axis if isinstance(axis, int) else 0), int), axis=axis
    ),
}


@pytest.mark.parametrize("fn", sorted(_CALLS))
@pytest.mark.parametrize("axis", [(0, 1), (1,), 1.0])
def test_softmax_axis_must_be_one_int(fn, axis):
    """softmax normalizes over one class axis: a tuple (or a float) is a TypeError that
    says so, not the normalization ops' text about statistics reducing over the other
    axes."""
    with pytest.raises(TypeError) as info:
        _CALLS[fn](jnp.ones((2, 3)), axis)
    name = "x" if fn == "softmax" else "logits"
    assert str(info.value) == (
        f"{fn}: axis must be an int (the one class axis of {name} that softmax normalizes "
        f"over); got {axis!r}"
    )


@pytest.mark.parametrize("fn", sorted(_CALLS))
@pytest.mark.parametrize("shape, axis", [((2, 0), -1), ((0, 3), 0), ((0,), 0)])
def test_softmax_empty_class_axis_is_a_clear_error(fn, shape, axis):
    """No class along the class axis: the max and the log-sum-exp are undefined. A
    ValueError naming the function, the argument, what it expects and what it got, at
    trace time (it was JAX's "zero-size array to reduction operation max"). An empty
    batch with classes stays fine."""
    name = "x" if fn == "softmax" else "logits"
    pattern = (
        rf"{fn}: {name} must have at least one class along axis {axis} \(the class axis\); "
        rf"got shape {re.escape(str(shape))}, with size 0 there"
    )
    for run in (lambda f: f, jax.jit):
        with pytest.raises(ValueError, match=pattern) as info:
            run(lambda z: _CALLS[fn](z, axis))(jnp.ones(shape))
        assert type(info.value) is ValueError
    assert _CALLS[fn](jnp.ones((0, 3)), -1).shape[0] == 0


# ------------------------------------------------------------ shard_map(check_vma=True)

_D = P(parallel.DATA_AXIS)


def _sharded_grad(f, specs, argnums, check_vma=True):
    """The gradient of sum(f(logits, labels)) under shard_map over 4 devices."""
    g = jax.grad(lambda z, t: jnp.sum(f(z, t).astype(jnp.float32)), argnums=argnums)
    out = tuple(specs[i] for i in argnums)
    return jax.jit(
        jax.shard_map(
            g, mesh=parallel.make_mesh(4), in_specs=specs, out_specs=out, check_vma=check_vma
        )
    )


# (op, (logits spec, labels spec), argnums, logits dtype): one input replicated, the other
# sharded, so the loss and its cotangent vary over the devices where that input does not.
_SHARD_CASES = {
    "sce, logits replicated, dz only": ("sce", (P(), _D), (0,), "float32"),
    "sce, logits replicated, dz and dt": ("sce", (P(), _D), (0, 1), "float32"),
    "sce, labels replicated, dz and dt": ("sce", (_D, P()), (0, 1), "float32"),
    "integer labels, logits replicated": ("int", (P(), _D), (0,), "float32"),
    "integer labels, bfloat16 logits replicated": ("int", (P(), _D), (0,), "bfloat16"),
}


@pytest.mark.parametrize("case", sorted(_SHARD_CASES))
def test_sce_under_shard_map_with_a_replicated_input_matches_autodiff(case):
    """A replicated input's gradient is the sum over the devices of the parts, as
    autodiff of the reference gives (it transposes the implicit broadcast of the input
    into a psum). With check_vma=True the rules returned a varying cotangent for an
    invariant input, a type error; check_vma=False is unchanged (each device's part)."""
    op, specs, argnums, dtype = _SHARD_CASES[case]
    k1, k2 = jax.random.split(jax.random.key(0))
    z = (3 * jax.random.normal(k1, (8, 5))).astype(dtype)
    if op == "sce":
        t = jax.nn.softmax(jax.random.normal(k2, (8, 5)))
        ours, theirs = jb.softmax_cross_entropy, ref.softmax_cross_entropy
    else:
        t = jnp.arange(8) % 5
        ours, theirs = _SCE_INT, ref.softmax_cross_entropy_with_integer_labels
    # a replicated input is one device's part of the sharded one's rows
    args = [z[:2] if specs[0] == P() else z, t[:2] if specs[1] == P() else t]
    for check_vma in (True, False):
        got = _sharded_grad(ours, specs, argnums, check_vma)(*args)
        want = _sharded_grad(theirs, specs, argnums, check_vma)(*args)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            # measured max 1.3e-7 of max|w| (float32); bfloat16: 0
            assert np.max(np.abs(g - w)) <= 1e-6 * np.max(np.abs(w)), case


# ------------------------------------------------------------ explicit sharding


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_integer_label_sce_under_an_explicit_mesh(dtype):
    """Logits and labels sharded over an Explicit mesh axis (sharding in types): the
    backward's row indices (an iota) were unsharded beside the sharded labels, a
    ShardingTypeError. Now dz keeps the logits' sharding and equals the unsharded dz."""
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    z = (3 * jax.random.normal(jax.random.key(0), (8, 5))).astype(dtype)
    y = jnp.array([0, 4, 2, 1, 3, 3, -1, 0])

    def grad(z, y):
        return jax.grad(lambda z: jnp.sum(_SCE_INT(z, y).astype(jnp.float32)))(z)

    want = jax.jit(grad)(z, y)
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh):
        zs, ys = jax.device_put(z, P("d")), jax.device_put(y, P("d"))
        got = jax.jit(grad)(zs, ys)
        assert jax.typeof(got).sharding.spec == P("d", None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
