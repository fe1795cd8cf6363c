"""linen and NNX IterNorm / ZCANorm: the running mean and running whitening matrix, eval
mode, linen/NNX agreement, use_autodiff, errors, training, shard_map.

Tiny shapes (N=4, groups=2, 12 rows), one compiled function per case. float32
tolerances: linen and NNX run the same op on the same values (a few ulps: 1e-6); the
running statistics against the op's batch statistics folded by hand (the same float32
expressions: 1e-6); the hand-derived gradients against autodiff of the reference
(max abs difference / max abs gradient, measured 3.5e-7 for IterNorm T=5 and ZCA on a
well-conditioned batch; bound 4e-6, about 10x).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx
from jax_batchinhib import ops, parallel

OPT0 = {"xla_backend_optimization_level": 0}
N, G, B = 4, 2, 12


def run0(f, *args):
    return jax.jit(f).lower(*args).compile(OPT0)(*args)


def close(a, b, atol=1e-6, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def batches(k, seed=0, rows=B):
    a = jnp.eye(N) + 0.6 * jax.random.uniform(jax.random.key(99), (N, N))
    keys = jax.random.split(jax.random.key(seed), k)
    return [1.0 + jax.random.normal(kk, (rows, N)) @ a for kk in keys]


LINEN = {"iter": bnn.IterNorm, "zca": bnn.ZCANorm}
NNX = {"iter": bnx.IterNorm, "zca": bnx.ZCANorm}
OP = {"iter": ops.iter_norm, "zca": ops.zca_norm}
INF = {"iter": ops.iter_norm_inference, "zca": ops.zca_norm_inference}
# (op, momentum, mask the last 3 rows of the second batch, virtual_batch_size)
CASES = {
    "iter_ema": ("iter", 0.8, False, None),
    "zca_cumulative_mask": ("zca", None, True, None),
    "iter_cumulative_ghost": ("iter", None, False, 6),
}


def mask_for(step, masked):
    return jnp.arange(B) < B - 3 if (masked and step == 1) else None


@pytest.mark.parametrize("case", list(CASES))
def test_running_stats_eval_and_nnx_agree(case):
    """Two training steps: y and the running mean/W equal the op's batch statistics
    folded by hand (EMA or cumulative; with a mask; per ghost batch, averaged); eval
    mode equals the inference op with the running statistics; the NNX module gives the
    same variables, outputs and statistics as linen."""
    kind, momentum, masked, vbs = CASES[case]
    xs = batches(2)
    opts = dict(groups=G, momentum=momentum, virtual_batch_size=vbs)
    lin = LINEN[kind](**opts, scale_init=nn.initializers.normal(1.0))
    mk = [mask_for(i, masked) for i in range(2)]

    def batch_stats(x, mask, scale, bias):
        def one(xs, m):
            return OP[kind](xs, scale, bias, groups=G, mask=m)

        if vbs is None:
            return one(x, mask)
        y, st = jax.vmap(lambda xs: one(xs, None))(x.reshape(B // vbs, vbs, N))
        return y.reshape(x.shape), jax.tree.map(lambda s: s.mean(0), st)

    def linen_and_ops(xs):
        v = lin.init(jax.random.key(0), xs[0], use_running_average=False)
        v0, ys, want = v, [], []
        for x, m in zip(xs, mk, strict=True):
            y, upd = lin.apply(v, x, use_running_average=False, mutable=["batch_stats"], mask=m)
            v = {**v, **upd}
            ys.append(y)
            want.append(batch_stats(x, m, v0["params"]["scale"], v0["params"]["bias"]))
        p, s = v["params"], v["batch_stats"]
        y_eval = lin.apply(v, xs[0], use_running_average=True)
        y_inf = INF[kind](xs[0], p["scale"], p["bias"], s["mean"], s["whitening_matrix"], groups=G)
        return v0, v, ys, want, y_eval, y_inf

    v0, v, ys, want, y_eval, y_inf = run0(linen_and_ops, xs)
    assert jax.tree.map(jnp.shape, v0["batch_stats"]) == {
        "mean": (N,),
        "whitening_matrix": (G, N // G, N // G),
        **({"count": ()} if momentum is None else {}),
    }
    close(v0["batch_stats"]["whitening_matrix"], np.broadcast_to(np.eye(N // G), (G, 2, 2)))
    for y, (yw, _) in zip(ys, want, strict=True):
        close(y, yw)
    mean, wm = v0["batch_stats"]["mean"], v0["batch_stats"]["whitening_matrix"]
    for k, (_, st) in enumerate(want, start=1):
        if momentum is None:
            mean = mean + (st.mean - mean) / k
            wm = wm + (st.whitening_matrix - wm) / k
        else:
            mean = momentum * mean + (1 - momentum) * st.mean
            wm = momentum * wm + (1 - momentum) * st.whitening_matrix
    close(v["batch_stats"]["mean"], mean)
    close(v["batch_stats"]["whitening_matrix"], wm)
    assert float(jnp.abs(wm - v0["batch_stats"]["whitening_matrix"]).max()) > 0.05
    if momentum is None:
        assert int(v["batch_stats"]["count"]) == 2
    close(y_eval, y_inf)

    model = NNX[kind](N, **opts, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(model))
    assert set(state) == set(v0["params"]) | set(v0["batch_stats"])
    model.scale[...] = v0["params"]["scale"]

    @nnx.jit
    def nnx_steps(model, xs):
        ys = [model(x, mask=m) for x, m in zip(xs, mk, strict=True)]
        return ys, model(xs[0], use_running_average=True)

    ys_n, y_eval_n = nnx_steps(model, xs)
    for a, b in zip(ys, ys_n, strict=True):
        close(a, b)
    close(y_eval, y_eval_n)
    final = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(close, v["batch_stats"], final)


@pytest.mark.parametrize("kind", ["iter", "zca"])
def test_use_autodiff_gradients_equal_the_hand_derived_ones(kind):
    """Gradients of a training-mode loss w.r.t. x, scale and bias: the hand-derived VJP
    (use_autodiff=False) against autodiff of the reference (use_autodiff=True)."""
    x = batches(1)[0]
    ct = jax.random.normal(jax.random.key(5), x.shape)
    init = dict(scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
    mods = [LINEN[kind](groups=G, use_autodiff=a, **init) for a in (False, True)]
    v = mods[0].init(jax.random.key(0), x, use_running_average=False)

    def grads(x, params):
        out = []
        for m in mods:

            def loss(x, p, m=m):
                y, _ = m.apply({**v, "params": p}, x, use_running_average=False,
                               mutable=["batch_stats"])  # fmt: skip
                return jnp.sum(y * ct)

            out.append(jax.grad(loss, argnums=(0, 1))(x, params))
        return out

    hand, auto = run0(grads, x, v["params"])
    for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(auto), strict=True):
        assert float(jnp.abs(a).max()) > 1e-3  # every gradient is non-trivial
        close(a, b, atol=4e-6 * float(jnp.abs(b).max()), rtol=0)


def test_errors_name_the_module():
    x = jnp.ones((8, 6))
    with pytest.raises(ValueError, match=r"IterNorm: groups=4 must divide .* N=6"):
        bnn.IterNorm(groups=4).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"ZCANorm: groups=4 must divide .* N=6"):
        bnx.ZCANorm(6, groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"IterNorm: iterations must be a Python int >= 1"):
        bnx.IterNorm(6, iterations=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"IterNorm: iterations must be a Python int >= 1"):
        bnn.IterNorm(iterations=0).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"ZCANorm: epsilon must be > 0"):
        bnn.ZCANorm(epsilon=0.0).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"ZCANorm: x has 6 features .* num_features=4"):
        bnx.ZCANorm(4, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"IterNorm: virtual_batch_size=3 must divide"):
        bnx.IterNorm(6, virtual_batch_size=3, rngs=nnx.Rngs(0))(x)


class _MLP(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(8)(x)
        h = self.norm(groups=2, momentum=0.9)(h, use_running_average=not train)
        return nn.Dense(1)(nn.relu(h))


@pytest.mark.parametrize("kind", ["iter", "zca"])
def test_tiny_mlp_trains(kind):
    """A Dense -> whitening -> relu -> Dense regression: the training loss falls by more
    than half in 30 Adam steps, and the eval-mode loss on the training data falls too.

    The input has as many features as the whitened layer (8): with fewer, the Dense
    output's covariance is singular, ZCA's W amplifies its null directions by
    epsilon^(-1/2), and an average of such W over changing weights whitens badly at eval
    (IterNorm's few Newton steps stay bounded there)."""
    x = jax.random.normal(jax.random.key(0), (48, 8))
    x = x @ (jnp.eye(8) + 0.3 * jax.random.normal(jax.random.key(2), (8, 8)))
    t = jnp.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    model = _MLP(LINEN[kind])
    v = model.init(jax.random.key(1), x, train=True)
    tx = optax.adam(0.03)

    def fit(v):
        def loss(p, bs):
            y, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True,
                                 mutable=["batch_stats"])  # fmt: skip
            return jnp.mean((y - t) ** 2), upd["batch_stats"]

        def step(c, _):
            p, bs, o = c
            (lv, bs), g = jax.value_and_grad(loss, has_aux=True)(p, bs)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), bs, o), lv

        c0 = (v["params"], v["batch_stats"], tx.init(v["params"]))
        (p, bs, _), losses = jax.lax.scan(step, c0, None, length=30)
        ev = jnp.mean((model.apply({"params": p, "batch_stats": bs}, x, train=False) - t) ** 2)
        ev0 = jnp.mean((model.apply(v, x, train=False) - t) ** 2)
        return losses, ev0, ev

    losses, ev0, ev = run0(fit, v)
    assert np.all(np.isfinite(losses))
    assert float(losses[-1]) < 0.5 * float(losses[0]), losses
    assert float(ev) < float(ev0), (ev0, ev)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py)")
def test_shard_map_axis_name_equals_one_device():
    """IterNorm with axis_name under shard_map over 8 CPU devices (2 rows each) and under
    jit on one device, full batch: the same outputs and running statistics (float32
    round-off: 1e-5)."""
    x = batches(1, rows=16)[0]
    one = bnn.IterNorm(groups=G, momentum=0.5)
    many = bnn.IterNorm(groups=G, momentum=0.5, axis_name="data")
    v = one.init(jax.random.key(0), x, use_running_average=False)

    def step(mdl, x):
        return mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    sharded = jax.shard_map(
        functools.partial(step, many),
        mesh=parallel.make_mesh(8),
        in_specs=P("data"),
        out_specs=(P("data"), P()),
        check_vma=False,
    )

    def both(x):
        return step(one, x), sharded(x)

    (y1, s1), (y8, s8) = run0(both, x)
    close(y1, y8, atol=1e-5)
    jax.tree.map(functools.partial(close, atol=1e-5), s1, s8)


def test_singular_covariance_running_w_amplifies_null_directions():
    """A layer fed by a Dense with fewer inputs (2) than its features (4) sees a rank-2
    covariance. ZCA's W = U (Lambda + eps)^(-1/2) U^T then has norm eps^(-1/2) along the
    null directions (316 at eps = 1e-5; measured 316.2), so at eval any input with a
    component off the training subspace is amplified 316-fold. IterNorm's T Newton steps
    grow a null direction by at most 1.5 per step: norm <= 1.5^T / sqrt(tr Sigma)
    (measured 2.1e-5 below that bound at T = 5: a null direction's eigenvalue eps/tr is
    almost 0, so each step multiplies it by almost exactly 1.5). docs/derivations.md
    ("Singular covariance in eval mode") states this; the study's models group their
    features so that no group is wider than the layer's fan-in."""
    x = jax.random.normal(jax.random.key(0), (64, 2)) @ jax.random.normal(jax.random.key(1), (2, N))
    norms = {}
    for kind in ("zca", "iter"):
        layer = LINEN[kind](
            use_running_average=False, momentum=None, use_scale=False, use_bias=False
        )
        _, upd = layer.apply(layer.init(jax.random.key(2), x), x, mutable=["batch_stats"])
        w = np.asarray(upd["batch_stats"]["whitening_matrix"][0], np.float64)
        norms[kind] = np.linalg.norm(w, 2)
    _, stats = ops.iter_norm(x)
    tr = float(np.trace(np.asarray(stats.cov[0], np.float64)) + N * 1e-5)
    assert norms["zca"] == pytest.approx(1e-5**-0.5, rel=1e-2), norms
    assert norms["iter"] <= 1.5**5 / np.sqrt(tr) * (1 + 1e-5), (norms, 1.5**5 / np.sqrt(tr))
