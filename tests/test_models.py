"""Example models: optax SGD and Adam training loops under jax.jit (linen) and nnx.jit
(NNX) run, lower the loss, update the running statistics, and eval mode uses them.

Data: 10 Gaussian classes in 64 dimensions (an 8x8 "image" for the CNN), separable
enough that 15 steps lower the training loss clearly; 64 examples per batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_batchinhib import softmax_cross_entropy
from jax_batchinhib.apps import models

STEPS = 15


def data(n=64, seed=0):
    kc, kx, ky = jax.random.split(jax.random.key(seed), 3)
    centers = 2.0 * jax.random.normal(kc, (10, 64))
    y = jax.random.randint(ky, (n,), 0, 10)
    x = centers[y] + jax.random.normal(kx, (n, 64))
    return x, jax.nn.one_hot(y, 10)


def loss_fn(logits, labels):
    return jnp.mean(softmax_cross_entropy(logits, labels))


LINEN = {
    "mlp_bn_sgd": (models.MLP(norm="batchnorm", dropout_rate=0.1), optax.sgd(0.1), False),
    "mlp_bn_inhib_adam": (
        models.MLP(features=(32,), norm="batchnorm+inhib", momentum=None),
        optax.adam(1e-2),
        False,
    ),
    "mlp_inhib_groups_adam": (
        models.MLP(features=(32,), norm="inhib", inhib_groups=4),
        optax.adam(1e-2),
        False,
    ),
    "cnn_bn_adam": (models.CNN(features=(8, 16), norm="batchnorm"), optax.adam(1e-2), True),
    "two_branch_sgd": (models.TwoBranch(), optax.sgd(0.1), False),
}


@pytest.mark.parametrize("case", list(LINEN))
def test_linen_training_loop(case):
    model, tx, image = LINEN[case]
    x, y = data()
    if image:
        x = x.reshape(-1, 8, 8, 1)
    v = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
    params, stats0 = v["params"], v.get("batch_stats", {})
    assert stats0, "these models keep running statistics"
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, key):
        def loss(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return loss_fn(logits, y), upd["batch_stats"]

        (val, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), stats, opt, val

    stats = stats0
    losses = []
    for i in range(STEPS):
        params, stats, opt, val = step(params, stats, opt, jax.random.key(i))
        losses.append(float(val))
    assert losses[-1] < 0.7 * losses[0], losses
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, stats0)
    assert all(jax.tree.leaves(changed)), changed

    @jax.jit
    def evaluate(params, stats, x):
        return model.apply({"params": params, "batch_stats": stats}, x, train=False)

    e = evaluate(params, stats, x)
    # eval mode uses the running statistics: no batch dependence, and other statistics
    # give other outputs
    np.testing.assert_allclose(evaluate(params, stats, x[:5]), e[:5], atol=1e-5)
    # (BatchInhib starts near the identity, so its statistics move logits by ~1e-4 after
    # 15 steps; float32 round-off on these logits is ~1e-6)
    assert float(jnp.abs(evaluate(params, stats0, x) - e).max()) > 1e-5
    assert float(loss_fn(e, y)) < losses[0]


NNX = {
    "mlp_bn_inhib_adam": (
        lambda: models.NnxMLP(64, (32,), norm="batchnorm+inhib", rngs=nnx.Rngs(0)),
        optax.adam(1e-2),
    ),
    "two_branch_sgd": (
        lambda: models.NnxTwoBranch(64, rngs=nnx.Rngs(0, dropout=1)),
        optax.sgd(0.1),
    ),
}


@pytest.mark.parametrize("case", list(NNX))
def test_nnx_training_loop(case):
    make, tx = NNX[case]
    model = make()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = data()
    stats0 = nnx.to_pure_dict(nnx.clone(nnx.state(model, nnx.BatchStat)))

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return loss_fn(model(x), y)

        val, g = nnx.value_and_grad(loss)(model)
        optimizer.update(model, g)
        return val

    model.train()
    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    assert losses[-1] < 0.7 * losses[0], losses
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, stats0)))

    @nnx.jit
    def evaluate(model, x):
        return model(x)

    model.eval()
    e = evaluate(model, x)
    np.testing.assert_allclose(evaluate(model, x[:5]), e[:5], atol=1e-5)
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, stats)  # eval leaves them alone
    assert float(loss_fn(e, y)) < losses[0]


def test_twobranch_structure_is_fixed():
    """The names and shapes another engineer's by-hand gradient relies on."""
    m = models.TwoBranch(features_a=5, features_b=3, num_classes=4)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((6, 7)), train=False))
    shapes = jax.tree.map(lambda a: a.shape, v)
    assert shapes == {
        "params": {
            "fc1a": {"kernel": (7, 5), "bias": (5,)},
            "fc2a": {"kernel": (5, 5), "bias": (5,)},
            "fc1b": {"kernel": (7, 3)},
            "center": {"bias": (3,)},
            "fc2b": {"kernel": (8, 4), "bias": (4,)},
        },
        "batch_stats": {"center": {"mean": (3,)}},
    }
    # concat order [relu(xBN), yA]: fc2b's first 3 input rows read branch B
    params = jax.tree.map(jnp.zeros, shapes["params"], is_leaf=lambda s: isinstance(s, tuple))
    params["fc2b"]["kernel"] = params["fc2b"]["kernel"].at[:3].set(1.0)
    params["center"]["bias"] = jnp.ones(3)  # relu(x - mean + 1) = 1 on zero input weights
    out = m.apply(
        {"params": params, "batch_stats": {"center": {"mean": jnp.zeros(3)}}},
        jnp.ones((6, 7)),
        train=False,
    )
    np.testing.assert_allclose(out, 3.0)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_dropout_rate_outside_0_1_is_refused(rate):
    """A negative rate silently disabled dropout (``if dropout_rate > 0``) where 1.5 was
    refused by Dropout: every model with a dropout_rate refuses a rate outside [0, 1]."""
    x = jnp.ones((4, 64))

    def init(m, x):
        return jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))

    msg = "dropout_rate must be a float in \\[0, 1\\]; got"
    with pytest.raises(ValueError, match=f"MLP: {msg}"):
        init(models.MLP(dropout_rate=rate), x)
    with pytest.raises(ValueError, match=f"CNN: {msg}"):
        init(models.CNN(dropout_rate=rate), x.reshape(4, 8, 8, 1))
    with pytest.raises(ValueError, match=f"NnxMLP: {msg}"):
        models.NnxMLP(64, dropout_rate=rate, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"NnxCNN: {msg}"):
        models.NnxCNN(1, dropout_rate=rate, rngs=nnx.Rngs(0))


def test_dropout_rate_bounds_are_allowed():
    x = jnp.ones((4, 64))
    for rate in (0.0, 1.0):
        v = jax.eval_shape(
            lambda r=rate: models.MLP(dropout_rate=r).init(jax.random.key(0), x, train=False)
        )
        assert "dense0" in v["params"]
        models.NnxMLP(64, (8,), dropout_rate=rate, rngs=nnx.Rngs(0))


def test_flax_batchnorm_chain_needs_a_float_momentum():
    """The MNIST-1D models used momentum 0.99 for a flax_batchnorm step given
    momentum=None, where MLP refuses it (flax's BatchNorm has no cumulative average)."""
    x = jnp.ones((4, 40))

    def init(m):
        return jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))

    with pytest.raises(ValueError, match="Mnist1dMLP: norm='flax_batchnorm' needs a float momen"):
        init(models.Mnist1dMLP(norm="flax_batchnorm", momentum=None))
    with pytest.raises(
        ValueError, match="Mnist1dCNN: norm='flax_batchnorm\\+inhib' needs a float momentum"
    ):
        init(models.Mnist1dCNN(norm="flax_batchnorm+inhib", momentum=None))
    chain = models.NormChain(models.parse_chain("t", "flax_batchnorm"), 0, momentum=None)
    with pytest.raises(ValueError, match="models.NormChain: norm='flax_batchnorm\\+relu' needs"):
        init(chain)
    # a float momentum is used as given; our BatchNorm keeps momentum=None
    v = init(models.Mnist1dMLP(norm="flax_batchnorm", momentum=0.9))
    assert "bn0" in v["batch_stats"]["norm0"]
    v = init(models.Mnist1dMLP(norm="batchnorm", momentum=None))
    assert "count" in v["batch_stats"]["norm0"]["bn0"]
