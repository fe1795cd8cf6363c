"""NNX modules: consistency with the linen modules (flax's own linen/NNX test, for ours),
parity with flax.nnx.BatchNorm, train()/eval()/nnx.view, call-time override, Dropout,
serialization, errors.

float32 tolerances: linen and NNX run the same op on the same values, so they agree to a
few ulps (1e-6); against flax's own BatchNorm, 1e-5 (different but equally accurate
variance computations, see tests/test_linen.py).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

OPT0 = {"xla_backend_optimization_level": 0}


def run0(f, *args):
    return jax.jit(f).lower(*args).compile(OPT0)(*args)


def close(a, b, atol=1e-6, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def batches(shape, k, seed=0):
    a = jnp.eye(shape[-1]) + 0.5 * jax.random.uniform(jax.random.key(99), (shape[-1],) * 2)
    keys = jax.random.split(jax.random.key(seed), k)
    return [1.0 + jax.random.normal(kk, shape) @ a for kk in keys]


@nnx.jit
def nnx_steps(model, xs):
    """Training-mode outputs for each batch, then the eval-mode output on xs[0]."""
    ys = [model(x) for x in xs]
    return ys, model(xs[0], use_running_average=True)


CASES = {
    "bn": (
        lambda: bnn.BatchNorm(momentum=0.8, scale_init=nn.initializers.normal(1.0)),
        lambda n, init: bnx.BatchNorm(n, momentum=0.8, scale_init=init, rngs=nnx.Rngs(0)),
        {"scale": "scale", "bias": "bias"},
    ),
    "bn_cumulative": (
        lambda: bnn.BatchNorm(momentum=None, unbiased=False),
        lambda n, init: bnx.BatchNorm(n, momentum=None, unbiased=False, rngs=nnx.Rngs(0)),
        {"scale": "scale", "bias": "bias"},
    ),
    "center": (
        lambda: bnn.BatchCenter(momentum=None, bias_init=nn.initializers.normal(1.0)),
        lambda n, init: bnx.BatchCenter(n, momentum=None, bias_init=init, rngs=nnx.Rngs(0)),
        {"bias": "bias"},
    ),
    "inhib": (
        lambda: bnn.BatchInhib(momentum=0.5, groups=2, alpha_init=nn.initializers.normal(1.0)),
        lambda n, init: bnx.BatchInhib(
            n, momentum=0.5, groups=2, alpha_init=init, rngs=nnx.Rngs(0)
        ),
        {"alpha": "alpha"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linen_and_nnx_agree(case):
    """Same variables (names, shapes), same outputs and statistics over 3 training steps,
    same eval output, with the linen parameters copied into the NNX module."""
    make_linen, make_nnx, names = CASES[case]
    xs = batches((12, 4), 3)
    lin = make_linen()

    def linen_steps(xs):
        v = lin.init(jax.random.key(0), xs[0], use_running_average=False)
        v0, ys = v, []
        for x in xs:
            y, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            v = {**v, **upd}
            ys.append(y)
        return v0, v, ys, lin.apply(v, xs[0], use_running_average=True)

    v0, v, ys, y_eval = run0(linen_steps, xs)
    model = make_nnx(4, nn.initializers.zeros)
    state = nnx.to_pure_dict(nnx.state(model))
    assert set(state) == set(v0["params"]) | set(v0["batch_stats"])
    for k in v0["batch_stats"]:
        np.testing.assert_array_equal(state[k], v0["batch_stats"][k])  # same initial stats
    for lk, nk in names.items():
        getattr(model, nk)[...] = v0["params"][lk]
    ys_n, y_eval_n = nnx_steps(model, xs)
    for a, b in zip(ys, ys_n, strict=True):
        close(a, b)
    close(y_eval, y_eval_n)
    final = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(lambda a, b: close(a, b), v["batch_stats"], final)


def test_nnx_batchnorm_interchangeable_with_flax_nnx():
    xs = batches((4, 3, 3, 5), 3, seed=1)
    ours = bnx.BatchNorm(5, momentum=0.9, unbiased=False, rngs=nnx.Rngs(0))
    flx = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    so, sf = nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(flx))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), so) == jax.tree.map(
        lambda a: (a.shape, a.dtype), sf
    )
    (yo, eo), (yf, ef) = nnx_steps(ours, xs), nnx_steps(flx, xs)
    for a, b in zip(yo, yf, strict=True):
        close(a, b, atol=1e-5)
    close(eo, ef, atol=1e-5)
    jax.tree.map(
        lambda a, b: close(a, b, atol=0, rtol=1e-6),
        nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(flx, nnx.BatchStat)),
    )


def test_train_eval_view_and_call_time_override():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.bn = bnx.BatchNorm(3, rngs=rngs)
            self.center = bnx.BatchCenter(3, rngs=rngs)
            self.inhib = bnx.BatchInhib(3, rngs=rngs)
            self.drop = bnx.Dropout(0.5, rngs=rngs)

    b = Block(nnx.Rngs(0, dropout=1))
    mods = (b.bn, b.center, b.inhib)
    assert not any(m.use_running_average for m in mods) and not b.drop.deterministic
    b.eval()
    assert all(m.use_running_average for m in mods) and b.drop.deterministic
    b.train()
    assert not any(m.use_running_average for m in mods) and not b.drop.deterministic
    view = nnx.view(b, use_running_average=True, deterministic=True)
    assert view.bn.use_running_average and view.drop.deterministic
    assert not b.bn.use_running_average
    # nnx.view_info lists each module's view arguments from set_view's docstring, as for
    # flax's modules (it raised KeyError on ours, whose docstrings had no Args section)
    info = nnx.view_info(b)
    assert "use_running_average: bool | None = None" in info, info
    assert "deterministic: bool | None = None" in info, info
    # the call-time flag wins over the attribute; eval mode leaves statistics alone
    x = batches((8, 3), 1)[0]
    before = nnx.to_pure_dict(nnx.state(b.bn, nnx.BatchStat))
    y = b.bn(x, use_running_average=True)
    close(y, x / np.sqrt(1 + 1e-5), atol=1e-6)  # initial stats: mean 0, var 1
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(b.bn, nnx.BatchStat)), before
    )


def test_nnx_dropout_matches_flax_nnx_dropout():
    x = batches((4, 6), 1)[0]
    ours = bnx.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
    flx = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=5))
    close(ours(x), flx(x), atol=1e-6)
    close(ours(x, rngs=jax.random.key(3)), flx(x, rngs=jax.random.key(3)), atol=1e-6)
    close(ours(x, deterministic=True), x, atol=0)
    with pytest.raises(ValueError, match="Dropout: deterministic is False but no rngs"):
        bnx.Dropout(0.3)(x)


def test_nnx_state_round_trips_through_flax_serialization():
    x = batches((8, 4), 1)[0]
    m = bnx.BatchInhib(4, momentum=None, groups=2, rngs=nnx.Rngs(0))
    nnx_steps(m, [x])
    state = nnx.to_pure_dict(nnx.state(m))
    blob = flax.serialization.msgpack_serialize(state)
    fresh = bnx.BatchInhib(4, momentum=None, groups=2, rngs=nnx.Rngs(1))
    st = nnx.state(fresh)
    nnx.replace_by_pure_dict(st, flax.serialization.msgpack_restore(blob))
    nnx.update(fresh, st)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(fresh)), state)
    assert int(fresh.count[...]) == 1


def test_nnx_errors_name_the_module_and_the_argument():
    x = jnp.ones((8, 6))
    with pytest.raises(ValueError, match=r"BatchNorm: x has 6 features .* num_features=4"):
        bnx.BatchNorm(4, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchNorm: use_running_average was given nowhere"):
        bnx.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchInhib: groups=4 must divide .* N=6"):
        bnx.BatchInhib(6, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchCenter: momentum must be a float in \[0, 1\]"):
        bnx.BatchCenter(6, momentum=-0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm: num_features must be an int >= 1"):
        bnx.BatchNorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"Dropout: broadcast_dims must be a sequence of ints"):
        bnx.Dropout(0.5, broadcast_dims=("h",))
