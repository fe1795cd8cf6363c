"""Checkpoints through orbax-checkpoint (an extra, not a runtime dependency).

A small model with our BatchNorm, BatchInhib and BatchCenter, all with ``momentum=None``
(the cumulative average and its ``count``), plus our Dropout, is trained with Adam; in
the middle of training its whole state (parameters, running statistics and counts,
optimizer state, dropout key state) is saved with ``orbax.checkpoint.StandardCheckpointer``
(the API flax's documentation uses for 0.12), restored into a model built from abstract
shapes (``jax.eval_shape`` / ``nnx.eval_shape``, as in flax's checkpointing guide), and
training continues. The result equals the uninterrupted run **bitwise**: the restored
arrays are the saved ones, and the same compiled step runs on them (CPU, deterministic).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

ocp = pytest.importorskip("orbax.checkpoint")

STEPS, SAVE_AT = 4, 2
TX = optax.adam(0.05)


def data(k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * k)
    xs = [1.0 + 2.0 * jax.random.normal(keys[i], (8, 3)) for i in range(k)]
    ts = [jax.random.normal(keys[k + i], (8, 2)) for i in range(k)]
    return xs, ts


XS, TS = data(STEPS)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(p.dtype, jax.dtypes.prng_key):
            p, q = jax.random.key_data(p), jax.random.key_data(q)
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def save(path, tree):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)  # the context manager waits for the (async) save


def restore(path, abstract):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract)


# ------------------------------------------------------------------------------ linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        x = nn.Dense(6, use_bias=False)(x)
        x = bnn.BatchNorm(momentum=None, use_running_average=ura)(x)
        x = nn.relu(nn.Dense(4, use_bias=False)(x))
        x = bnn.BatchInhib(momentum=None, groups=2, use_running_average=ura)(x)
        x = bnn.BatchCenter(momentum=None, use_running_average=ura)(x)
        x = bnn.Dropout(0.25, deterministic=not train)(x)
        return nn.Dense(2)(x)


LNET = LinenNet()


@jax.jit
def linen_init():
    variables = LNET.init(jax.random.key(0), XS[0], train=False)
    return {"variables": variables, "opt_state": TX.init(variables["params"]), "step": 0}


@jax.jit
def linen_step(state, x, t):
    v = state["variables"]
    rng = jax.random.fold_in(jax.random.key(1), state["step"])

    def loss(params):
        y, upd = LNET.apply(
            {**v, "params": params}, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )
        return jnp.mean((y - t) ** 2), upd

    grads, upd = jax.grad(loss, has_aux=True)(v["params"])
    updates, opt_state = TX.update(grads, state["opt_state"], v["params"])
    params = optax.apply_updates(v["params"], updates)
    return {
        "variables": {"params": params, **upd},
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }


def test_linen_checkpoint_mid_training_continues_like_uninterrupted(tmp_path):
    straight = linen_init()
    for x, t in zip(XS, TS, strict=True):
        straight = linen_step(straight, x, t)

    state = linen_init()
    for x, t in zip(XS[:SAVE_AT], TS[:SAVE_AT], strict=True):
        state = linen_step(state, x, t)
    save(tmp_path / "linen", state)
    del state
    abstract = jax.eval_shape(linen_init)
    state = restore(tmp_path / "linen", abstract)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    stats = state["variables"]["batch_stats"]
    assert {k: int(jnp.max(s["count"])) for k, s in stats.items()} == {
        "BatchNorm_0": SAVE_AT,
        "BatchInhib_0": SAVE_AT,
        "BatchCenter_0": SAVE_AT,
    }
    for x, t in zip(XS[SAVE_AT:], TS[SAVE_AT:], strict=True):
        state = linen_step(state, x, t)

    assert int(state["variables"]["batch_stats"]["BatchInhib_0"]["count"]) == STEPS
    assert_trees_equal(state, straight)
    # the eval-mode outputs (running statistics) agree as well
    evaluate = jax.jit(lambda v: LNET.apply(v, XS[0], train=False))
    np.testing.assert_array_equal(evaluate(state["variables"]), evaluate(straight["variables"]))


# -------------------------------------------------------------------------------- NNX


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.lin1 = nnx.Linear(3, 6, use_bias=False, rngs=rngs)
        self.bn = bnx.BatchNorm(6, momentum=None, rngs=rngs)
        self.lin2 = nnx.Linear(6, 4, use_bias=False, rngs=rngs)
        self.inhib = bnx.BatchInhib(4, momentum=None, groups=2, rngs=rngs)
        self.center = bnx.BatchCenter(4, momentum=None, rngs=rngs)
        self.drop = bnx.Dropout(0.25, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.lin2(self.bn(self.lin1(x))))
        return self.out(self.drop(self.center(self.inhib(x))))


def nnx_new():
    model = NnxNet(nnx.Rngs(0, dropout=1))
    return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


@nnx.jit
def nnx_step(model, opt, x, t):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - t) ** 2))(model)
    opt.update(model, grads)


def test_nnx_checkpoint_mid_training_continues_like_uninterrupted(tmp_path):
    model, opt = nnx_new()
    for x, t in zip(XS, TS, strict=True):
        nnx_step(model, opt, x, t)
    straight = {"model": nnx.state(model), "opt": nnx.state(opt)}

    model, opt = nnx_new()
    for x, t in zip(XS[:SAVE_AT], TS[:SAVE_AT], strict=True):
        nnx_step(model, opt, x, t)
    save(tmp_path / "nnx", {"model": nnx.state(model), "opt": nnx.state(opt)})
    del model, opt

    abs_model, abs_opt = nnx.eval_shape(nnx_new)
    graphdef, abs_state = nnx.split(abs_model)
    restored = restore(tmp_path / "nnx", {"model": abs_state, "opt": nnx.state(abs_opt)})
    model = nnx.merge(graphdef, restored["model"])
    opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
    nnx.update(opt, restored["opt"])
    assert [int(jnp.max(m.count[...])) for m in (model.bn, model.inhib, model.center)] == [
        SAVE_AT
    ] * 3
    for x, t in zip(XS[SAVE_AT:], TS[SAVE_AT:], strict=True):
        nnx_step(model, opt, x, t)

    assert int(model.inhib.count[...]) == STEPS
    assert_trees_equal(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(straight["model"]))
    assert_trees_equal(nnx.to_pure_dict(nnx.state(opt)), nnx.to_pure_dict(straight["opt"]))
