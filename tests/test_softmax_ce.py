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

import jax_batchinhib as jb
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
