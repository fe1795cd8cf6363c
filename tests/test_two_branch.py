"""The two-branch network (docs/derivations.md, section 6): the backward chained by hand
equals jax.grad.

All in float64 on a small batch; a correct chain agrees with autodiff to round-off
(~1e-15 relative here), so the tolerance is 1e-10 relative (normwise, per parameter).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib.apps import two_branch as tb
from jax_batchinhib.apps.models import TwoBranch

RTOL = 1e-10  # float64 round-off, normwise relative
RATE = 0.3
M, D, FA, FB, K = 9, 5, 6, 7, 4


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def f64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


@pytest.fixture(scope="module")
def setup():
    """Model, float64 variables (non-zero centering bias), data, rngs, and both gradients."""
    with jax.enable_x64(True):
        out = {}
        for autodiff in (False, True):
            model = TwoBranch(FA, FB, K, dropout_rate=RATE, use_autodiff=autodiff)
            kx, kp, kc = jax.random.split(jax.random.key(0), 3)
            x = jax.random.normal(kx, (M, D), jnp.float64) + 0.5
            labels = jax.nn.one_hot(jnp.arange(M) % K, K, dtype=jnp.float64)
            v = f64(model.init({"params": kp}, x, train=False))
            v["params"]["center"]["bias"] = jax.random.normal(kc, (FB,), jnp.float64)
            rngs = {"dropout": jax.random.key(7)}
            keep, logits = tb.dropout_keep_mask(model, v, x, rngs)
            plain, _ = model.apply(v, x, train=True, rngs=rngs, mutable=["batch_stats"])
            loss_h, g_h = tb.grads_by_hand(v["params"], x, labels, keep, RATE)
            loss_a, g_a = tb.grads_autodiff(model, v, x, labels, rngs)
            out[autodiff] = jax.device_get(
                dict(
                    x=x, labels=labels, v=v, keep=keep, logits=logits, plain=plain,
                    loss_h=loss_h, loss_a=loss_a, g_h=g_h, g_a=g_a,
                )
            )  # fmt: skip
        return out


PATHS = [
    ("fc1a", "kernel"),
    ("fc1a", "bias"),
    ("fc2a", "kernel"),
    ("fc2a", "bias"),
    ("fc1b", "kernel"),
    ("center", "bias"),
    ("fc2b", "kernel"),
    ("fc2b", "bias"),
]


def test_param_layout_is_the_models(setup):
    s = setup[False]
    want = {tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(s["g_a"])}
    assert want == set(PATHS)
    for a, b in zip(jax.tree.leaves(s["g_h"]), jax.tree.leaves(s["g_a"]), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.float64


def test_dropout_mask_is_the_models(setup):
    """The recovered mask reproduces the uninstrumented forward exactly, drops something,
    and keeps something (so the dropout rule is exercised)."""
    s = setup[False]
    np.testing.assert_array_equal(s["logits"], s["plain"])
    assert 0 < float(np.mean(s["keep"])) < 1
    with jax.enable_x64(True):
        logits_hand, _ = jax.device_get(tb.forward(s["v"]["params"], s["x"], s["keep"], RATE))
    np.testing.assert_allclose(logits_hand, s["plain"], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("autodiff", [False, True], ids=["custom_vjp_layers", "plain_autodiff"])
@pytest.mark.parametrize("path", PATHS, ids=["/".join(p) for p in PATHS])
def test_by_hand_equals_jax_grad(setup, autodiff, path):
    """Every parameter's hand-chained gradient equals jax.grad of the Flax model's loss,
    with the library's custom VJPs inside and with plain autodiff of the references."""
    s = setup[autodiff]
    np.testing.assert_allclose(s["loss_h"], s["loss_a"], rtol=RTOL)
    a, b = s["g_h"][path[0]][path[1]], s["g_a"][path[0]][path[1]]
    assert float(np.max(np.abs(b))) > 1e-6  # a gradient that is not trivially zero
    assert rel(a, b) < RTOL


def test_seed_centering_rule_is_detectably_wrong(setup):
    """The comparison can fail: the original derivation's batch-centering line dx1B = dxBN (1 - 1/m)
    gives an fc1b gradient that misses autodiff by far more than the tolerance."""
    s = setup[False]
    with jax.enable_x64(True):
        p = s["v"]["params"]
        _, c = tb.forward(p, s["x"], s["keep"], RATE)
        dx2B = (jax.nn.softmax(c["x2B"], -1) - s["labels"]) / M
        dxBN = (dx2B @ p["fc2b"]["kernel"].T)[:, :FB] * (c["xBN"] > 0)
        seed = s["x"].T @ (dxBN * (1 - 1 / M))
        right = s["x"].T @ (dxBN - dxBN.mean(0))
        seed, right = jax.device_get((seed, right))
    assert rel(right, s["g_a"]["fc1b"]["kernel"]) < RTOL
    assert rel(seed, s["g_a"]["fc1b"]["kernel"]) > 1e-3


def test_keep_mask_needs_one_dropout():
    class NoDropout(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(2)(x)

    m = NoDropout()
    x = jnp.ones((3, 2))
    v = m.init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match="dropout_keep_mask: expected one Dropout call; saw 0"):
        tb.dropout_keep_mask(m, v, x, {"dropout": jax.random.key(1)})


def test_by_hand_equals_jax_grad_at_rate_one():
    """At rate 1 the Dropout layer outputs 0 with a zero gradient, but the hand rule's
    multiplier keep / (1 - rate) was 0/0: NaN loss and gradients. Every unit dropped,
    the multiplier is 0 and the hand chain agrees with autodiff."""
    with jax.enable_x64(True):
        model = TwoBranch(FA, FB, K, dropout_rate=1.0)
        kx, kp = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, (M, D), jnp.float64)
        labels = jax.nn.one_hot(jnp.arange(M) % K, K, dtype=jnp.float64)
        v = f64(model.init({"params": kp}, x, train=False))
        rngs = {"dropout": jax.random.key(3)}
        keep, _ = tb.dropout_keep_mask(model, v, x, rngs)
        loss_h, g_h = jax.device_get(tb.grads_by_hand(v["params"], x, labels, keep, 1.0))
        loss_a, g_a = jax.device_get(tb.grads_autodiff(model, v, x, labels, rngs))
    assert not np.any(keep)
    assert np.isfinite(loss_h)
    np.testing.assert_allclose(loss_h, loss_a, rtol=RTOL)
    for path in PATHS:
        a, b = g_h[path[0]][path[1]], g_a[path[0]][path[1]]
        assert np.all(np.isfinite(a)), path
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-14, err_msg="/".join(path))
    # nothing reaches branch A's first layer, or FC_2A's weights (their input is 0)
    assert not np.any(g_h["fc1a"]["kernel"]) and not np.any(g_h["fc2a"]["kernel"])
