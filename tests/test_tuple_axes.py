"""Several feature axes (``axis`` a tuple, as flax's ``BatchNorm(axis=(1, 3))``): the
statistics reduce over every other axis, the per-feature vectors have the feature shape
(the sizes along those axes, in increasing axis order). batch_inhib flattens the feature
axes into N = their product features (alpha (N, N)).

Against flax.linen.BatchNorm with the same tuple axis (momentum 0, so its stored
statistics are the batch's): y and the statistics to float32 round-off (measured 4e-6
one-pass, 5e-7 two-pass on values of 3), for both variance algorithms; every rule
against autodiff of the reference with a tuple axis; bad tuples get clear errors.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp

X_SHAPE = (4, 3, 5, 2)  # features on axes 1 and 3: feature shape (3, 2)


def data(dtype=jnp.float32):
    return (3 + jax.random.normal(jax.random.key(0), X_SHAPE)).astype(dtype)


@pytest.mark.parametrize("fast", [True, False], ids=["one_pass", "two_pass"])
def test_batch_norm_matches_flax_tuple_axis(fast):
    x = data()
    bn = nn.BatchNorm(use_running_average=False, axis=(1, 3), momentum=0.0, use_fast_variance=fast)
    v = bn.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: a + 0.1 * jnp.arange(a.size).reshape(a.shape), v["params"])
    y_f, upd = bn.apply({"params": p, **{"batch_stats": v["batch_stats"]}}, x, mutable=True)
    y, st = jb.batch_norm(x, p["scale"], p["bias"], axis=(1, 3), use_fast_variance=fast)
    assert st.mean.shape == st.var.shape == (3, 2)
    np.testing.assert_allclose(y, y_f, rtol=0, atol=2e-5)  # measured 4e-6
    np.testing.assert_allclose(st.mean, upd["batch_stats"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(st.var, upd["batch_stats"]["var"], rtol=2e-5)
    # and the statistics are those of each (H, C) pair over the batch and W
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(st.var, x64.var((0, 2)), rtol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rules_with_tuple_axis_match_reference(dtype):
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        x = data(dt)
        sc = (1 + 0.1 * jnp.arange(6.0).reshape(3, 2)).astype(dt)
        b = (0.2 - 0.1 * jnp.arange(6.0).reshape(3, 2)).astype(dt)
        rows = jnp.arange(20).reshape(4, 5) % 3 > 0  # x's shape without the feature axes
        for axis in ((1, 3), (-1, 1)):
            check_vjp(jb.batch_norm, ref.batch_norm, x, sc, b, axis=axis)
            check_vjp(jb.batch_norm, ref.batch_norm, x, sc, b, axis=axis, mask=rows)
            check_vjp(jb.batch_center, ref.batch_center, x, b, axis=axis, mask=rows)
        st = jb.batch_norm(x, axis=(1, 3))[1]
        check_vjp(
            jb.batch_norm_inference, ref.batch_norm_inference, x, sc, b, st.mean, st.var + 1,
            axis=(1, 3),
        )  # fmt: skip
        check_vjp(jb.batch_center_inference, ref.batch_center_inference, x, b, st.mean, axis=(1, 3))
        a = (0.3 * jax.random.normal(jax.random.key(1), (6, 6))).astype(dt)
        check_vjp(jb.batch_inhib, ref.batch_inhib, x, a, axis=(1, 3), mask=rows)
        _, si = jb.batch_inhib(x, a, axis=(1, 3))
        assert si.mean.shape == (6,) and si.cov.shape == (1, 6, 6)
        check_vjp(jb.batch_inhib_inference, ref.batch_inhib_inference, x, a, si.cov[0], axis=(1, 3))


def test_batch_inhib_tuple_axis_flattens_features():
    """axis=(1, 3) is axis=-1 after moving the feature axes last and flattening them."""
    x = data()
    a = 0.3 * jax.random.normal(jax.random.key(1), (6, 6))
    y, st = jb.batch_inhib(x, a, axis=(1, 3))
    xt = jnp.moveaxis(x, (1, 3), (2, 3)).reshape(4, 5, 6)
    y2, st2 = jb.batch_inhib(xt, a)
    np.testing.assert_allclose(jnp.moveaxis(y, (1, 3), (2, 3)).reshape(4, 5, 6), y2, atol=1e-6)
    np.testing.assert_allclose(st.cov, st2.cov, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "axis, err, msg",
    [
        ((1, 1), ValueError, r"batch_norm: axis must not repeat an axis; got \(1, 1\)"),
        ((1, 7), ValueError, r"batch_norm: axis 7 is out of range for x with 4 dimensions"),
        ((), ValueError, r"batch_norm: axis must be an int or a non-empty tuple of ints"),
        ((1.0, 2), TypeError, r"batch_norm: axis must be an int or a tuple of ints"),
        ((0, 1, 2, 3), ValueError, r"batch_norm: axis=\(0, 1, 2, 3\) names every axis"),
    ],
)
def test_bad_tuple_axis(axis, err, msg):
    with pytest.raises(err, match=msg):
        jb.batch_norm(data(), axis=axis)


def test_scale_must_have_feature_shape():
    with pytest.raises(ValueError, match=r"batch_norm: scale must have the feature shape \(3, 2\)"):
        jb.batch_norm(data(), jnp.ones(6), axis=(1, 3))


def test_inference_with_a_feature_axis_of_size_one():
    """Feature shape (3, 1): the inference backward kept its (3, 1) shape (it squeezed
    the size-1 axis and broadcast (3,) against (3, 1) into (3, 3) before)."""
    x = jax.random.normal(jax.random.key(0), (8, 3, 1))
    mean, var = 0.1 * jnp.ones((3, 1)), 2.0 * jnp.ones((3, 1))
    sc, b = jnp.full((3, 1), 1.5), jnp.full((3, 1), 0.2)
    check_vjp(jb.batch_norm_inference, ref.batch_norm_inference, x, sc, b, mean, var, axis=(1, 2))
    check_vjp(jb.batch_norm_inference, ref.batch_norm_inference, x, None, None, mean, var,
              axis=(1, 2))  # fmt: skip
