"""Our modules under flax's lifted transforms: one training step each, compared with the
same computation done without the transform (model by model, layer by layer).

NNX: ``nnx.vmap`` (an ensemble built with ``nnx.split_rngs`` + ``nnx.vmap``, as flax's
docs show; and the batch split over a vmapped ``axis_name``), ``nnx.scan`` over a stack of
layers, ``nnx.remat``, ``nnx.eval_shape``.
Linen: ``nn.vmap`` (``variable_axes`` params/batch_stats, ``split_rngs``; and the batch
split over a vmapped ``axis_name``), ``nn.scan``, ``nn.remat``.

Each block is Dense -> BatchNorm (EMA) -> BatchInhib (``momentum=None``: cumulative
average and count; ``alpha`` zero, i.e. full-strength inhibition, with the ``abs``
denominator and the relative guard, which keep its gradients of O(1)) -> relu, so a step
updates every kind of running statistic. The comparisons are float32: the transformed
and the plain program compute the same values with differently batched matmuls and
reductions, so they agree to round-off: measured difference (the largest elementwise
|a - b| / max(1, |b|), under pytest's 8 CPU devices) given per test, at most 6.3e-7 (a
BatchNorm scale gradient without jit, sums of 8 products in another order: about 5
float32 ulps); the tolerance 1e-6 (absolute and relative, about 8 ulps) is 1.6x that.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

N, B = 4, 8  # features, batch
E = L = 3  # ensemble members, stacked layers
LR = 0.1
# full-strength inhibition (alpha = 0) with the well-conditioned denominator and guard
INHIB = dict(alpha_init=jax.nn.initializers.zeros, denominator="abs", guard_mode="relative")


def close(a, b, atol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=atol)


def trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda p, q: close(p, q, atol), a, b)


def data(shape, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return 1.0 + 2.0 * jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def updated(before, after):
    """Every running statistic moved (the step did update them)."""
    for p, q in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert not np.array_equal(np.asarray(p), np.asarray(q))


# =============================================================================== NNX


class Block(nnx.Module):
    def __init__(self, n, *, rngs, axis_name=None):
        self.lin = nnx.Linear(n, n, use_bias=False, rngs=rngs)
        self.bn = bnx.BatchNorm(n, momentum=0.8, axis_name=axis_name, rngs=rngs)
        self.inhib = bnx.BatchInhib(n, momentum=None, axis_name=axis_name, rngs=rngs, **INHIB)

    def __call__(self, x):
        return nnx.relu(self.inhib(self.bn(self.lin(x))))


def stacked(k, seed=0):
    """``k`` blocks with their variables stacked on a leading axis (flax's recipe)."""

    @nnx.split_rngs(splits=k)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(N, rngs=rngs)

    return create(nnx.Rngs(seed))


def unstack(model, k):
    """The ``k`` blocks of a stacked model as separate ``Block`` s (copies)."""
    pure = nnx.to_pure_dict(nnx.state(model))
    out = []
    for i in range(k):
        blk = Block(N, rngs=nnx.Rngs(123))
        st = nnx.state(blk)
        nnx.replace_by_pure_dict(st, jax.tree.map(lambda a, i=i: a[i], pure))
        nnx.update(blk, st)
        out.append(blk)
    return out


def stats(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.partial(nnx.jit, static_argnums=0)
def sgd_step(loss_fn, model, *args):
    """One SGD step of ``loss_fn(model, *args)`` (the statistics update in the forward)."""
    grads = nnx.grad(loss_fn)(model, *args)
    nnx.update(model, jax.tree.map(lambda p, g: p - LR * g, nnx.state(model, nnx.Param), grads))


def mse(y, t):
    return jnp.mean((y - t) ** 2)


def test_nnx_vmap_over_examples_with_axis_name_is_full_batch_norm():
    """nnx.vmap over the examples of one batch with ``axis_name`` (statistics reduced
    over the vmapped axis; the module broadcast, ``in_axes=None``, so its running
    statistics must come out unbatched, as flax's): one step equals the module on the
    whole batch (measured difference 2.1e-7)."""
    per_example = Block(N, rngs=nnx.Rngs(4), axis_name="batch")
    whole = Block(N, rngs=nnx.Rngs(4))
    x, t = data((B, N), seed=7)
    before = stats(whole)

    def per_example_loss(m, x, t):
        y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name="batch")(m, x)
        return mse(y, t)

    sgd_step(per_example_loss, per_example, x, t)
    sgd_step(lambda m, x, t: mse(m(x), t), whole, x, t)
    updated(before, stats(whole))
    trees_close(stats(per_example), stats(whole), 1e-6)
    trees_close(params(per_example), params(whole), 1e-6)


def test_nnx_vmap_ensemble_trains_each_member_like_alone():
    """An ensemble of E blocks, each on its own batch, under nnx.vmap: one step equals
    each member's own step (measured difference 0)."""
    ens = stacked(E)
    members = unstack(ens, E)
    xs, ts = data((E, B, N), seed=1)
    before = stats(ens)

    def ens_loss(ens, xs, ts):
        ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(ens, xs)
        return jnp.sum(jax.vmap(mse)(ys, ts))

    sgd_step(ens_loss, ens, xs, ts)
    updated(before, stats(ens))
    assert int(ens.inhib.count[0]) == 1 and ens.inhib.count.shape == (E,)

    def one_loss(m, x, t):
        return mse(m(x), t)

    for i, m in enumerate(members):
        sgd_step(one_loss, m, xs[i], ts[i])
        trees_close(jax.tree.map(lambda a, i=i: a[i], stats(ens)), stats(m), 1e-6)
        trees_close(jax.tree.map(lambda a, i=i: a[i], params(ens)), params(m), 1e-6)
    # the members really differ (split rngs): a wrongly broadcast init would not
    assert not np.allclose(ens.lin.kernel[0], ens.lin.kernel[1])


class Stack(nnx.Module):
    def __init__(self, rngs_seed=0):
        self.blocks = stacked(L, rngs_seed)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.blocks)


def test_nnx_scan_over_layers_trains_like_layer_by_layer():
    """nnx.scan over L stacked blocks: one step equals applying the blocks one after the
    other (measured difference 0)."""
    model = Stack()
    layers = unstack(model.blocks, L)
    x, t = data((B, N), seed=2)
    before = stats(model)
    sgd_step(lambda m, x, t: mse(m(x), t), model, x, t)
    updated(before, stats(model))

    def seq_loss(layers, x, t):
        for blk in layers:
            x = blk(x)
        return mse(x, t)

    layers = nnx.List(layers)
    sgd_step(seq_loss, layers, x, t)
    for i, blk in enumerate(layers):
        trees_close(jax.tree.map(lambda a, i=i: a[i], stats(model.blocks)), stats(blk), 1e-6)
        trees_close(jax.tree.map(lambda a, i=i: a[i], params(model.blocks)), params(blk), 1e-6)


class Remat(nnx.Module):
    def __init__(self, remat, rngs):
        self.block = Block(N, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        if self.remat:
            return nnx.remat(lambda blk, x: blk(x))(self.block, x)
        return self.block(x)


def test_nnx_remat_trains_like_without():
    """nnx.remat around a block: the statistics are updated once per step, and the
    step equals the one without remat (measured difference 0)."""
    x, t = data((B, N), seed=3)
    a, b = Remat(True, nnx.Rngs(0)), Remat(False, nnx.Rngs(0))
    before = stats(a)
    for m in (a, b):
        sgd_step(lambda m, x, t: mse(m(x), t), m, x, t)
    updated(before, stats(a))
    assert int(a.block.inhib.count[...]) == 1  # updated once, not again in the recompute
    trees_close(stats(a), stats(b), 1e-6)
    trees_close(params(a), params(b), 1e-6)


def test_nnx_eval_shape_builds_abstract_model_and_leaks_no_tracer():
    """nnx.eval_shape of the constructor gives the concrete model's state shapes and
    dtypes; a state restored into it trains like the original; nnx.eval_shape of a
    training-mode call gives the output shape and leaves the statistics untouched."""
    concrete = Block(N, rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: Block(N, rngs=nnx.Rngs(0)))
    spec = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
    assert spec(abstract) == spec(concrete)

    x, t = data((B, N), seed=4)
    before = stats(concrete)
    out = nnx.eval_shape(lambda m, x: m(x), concrete, x)
    assert (out.shape, out.dtype) == ((B, N), jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, stats(concrete), before)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(stats(concrete)))

    graphdef, st = nnx.split(abstract)
    nnx.replace_by_pure_dict(st, nnx.to_pure_dict(nnx.state(concrete)))
    restored = nnx.merge(graphdef, st)
    for m in (concrete, restored):
        sgd_step(lambda m, x, t: mse(m(x), t), m, x, t)
    updated(before, stats(concrete))
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(restored)),
        nnx.to_pure_dict(nnx.state(concrete)),
    )


# ============================================================================= linen


class LBlock(nn.Module):
    train: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        ura = not self.train
        x = nn.Dense(N, use_bias=False)(x)
        x = bnn.BatchNorm(momentum=0.8, use_running_average=ura, axis_name=self.axis_name)(x)
        x = bnn.BatchInhib(
            momentum=None, use_running_average=ura, axis_name=self.axis_name, **INHIB
        )(x)
        return nn.relu(x)


def linen_step(module, variables, x, t):
    """One SGD step: new variables (params stepped, batch_stats updated)."""

    def loss(p):
        y, upd = module.apply({**variables, "params": p}, x, mutable=["batch_stats"])
        return mse(y, t), upd

    g, upd = jax.grad(loss, has_aux=True)(variables["params"])
    p = jax.tree.map(lambda a, b: a - LR * b, variables["params"], g)
    return {"params": p, **upd}


def test_linen_vmap_ensemble_trains_each_member_like_alone():
    """nn.vmap over E members (variable_axes params/batch_stats 0, split params rngs),
    each on its own batch (measured difference 3.0e-7)."""
    VBlock = nn.vmap(
        LBlock,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=0,
        out_axes=0,
    )
    ens, one = VBlock(), LBlock()
    xs, ts = data((E, B, N), seed=5)

    @jax.jit
    def run(xs, ts):
        v = ens.init(jax.random.key(0), xs)
        new = linen_step(ens, v, xs, ts)
        members = []
        for i in range(E):
            vi = jax.tree.map(lambda a, i=i: a[i], v)
            members.append(linen_step(one, vi, xs[i], ts[i]))
        return v, new, members

    v, new, members = run(xs, ts)
    updated(v["batch_stats"], new["batch_stats"])
    assert new["batch_stats"]["BatchInhib_0"]["count"].shape == (E,)
    assert not np.allclose(v["params"]["Dense_0"]["kernel"][0], v["params"]["Dense_0"]["kernel"][1])
    for i, m in enumerate(members):
        # the ensemble's loss is the mean over members' mse: its gradient is 1/E of each
        # member's; compare the statistics exactly-ish and the step scaled accordingly
        trees_close(jax.tree.map(lambda a, i=i: a[i], new["batch_stats"]), m["batch_stats"], 1e-6)
        step_ens = jax.tree.map(lambda a, b, i=i: (a[i] - b[i]) * E, new["params"], v["params"])
        step_one = jax.tree.map(lambda a, b, i=i: a - b[i], m["params"], v["params"])
        trees_close(step_ens, step_one, 1e-6)


def test_linen_vmap_over_examples_with_axis_name_is_full_batch_norm():
    """nn.vmap over the examples of one batch with ``axis_name`` (statistics reduced
    over the vmapped axis; variables broadcast): the step equals the un-vmapped module
    on the whole batch (measured difference 4.2e-7)."""
    VBlock = nn.vmap(
        LBlock,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        in_axes=0,
        out_axes=0,
        axis_name="batch",
    )
    per_example, whole = VBlock(axis_name="batch"), LBlock()
    x, t = data((B, N), seed=6)

    @jax.jit
    def run(x, t):
        v = whole.init(jax.random.key(0), x)
        return v, linen_step(per_example, v, x, t), linen_step(whole, v, x, t)

    v, a, b = run(x, t)
    updated(v["batch_stats"], a["batch_stats"])
    trees_close(a, b, 1e-6)


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("layer", ["BatchNorm", "BatchCenter"])
def test_grad_under_vmap_with_axis_name_without_jit_is_full_batch(layer, api):
    """``jax.grad`` / ``nnx.grad`` through ``nn.vmap`` / ``nnx.vmap`` over the examples
    with ``axis_name``, not jitted: the gradients equal the un-vmapped module's on the
    whole batch (measured difference 6.3e-7 for BatchNorm, in dscale, 1.2e-7 for
    BatchCenter), and the statistics' unbatched cotangent
    raises no ``NameError: unbound axis name``."""
    x, w = data((B, N), seed=8)

    def loss_of(y):
        return jnp.sum(jnp.sin(y) * w)

    if api == "linen":
        mod = getattr(bnn, layer)
        per = nn.vmap(
            mod, in_axes=0, out_axes=0, variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False}, axis_name="b",
        )(use_running_average=False, axis_name="b")  # fmt: skip
        whole = mod(use_running_average=False)
        v = whole.init(jax.random.key(0), x)

        def grads(m):
            def loss(p, x):
                return loss_of(m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0])

            return jax.grad(loss, argnums=(0, 1))(v["params"], x)

        got, want = grads(per), grads(whole)
    else:
        mod = getattr(bnx, layer)
        per_example = nnx.vmap(lambda m, xi: m(xi), in_axes=(None, 0), axis_name="b")

        def grads(m, call):
            g, dx = nnx.grad(lambda m, x: loss_of(call(m, x)), argnums=(0, 1))(m, x)
            return nnx.to_pure_dict(g), dx

        got = grads(mod(N, axis_name="b", rngs=nnx.Rngs(0)), per_example)
        want = grads(mod(N, rngs=nnx.Rngs(0)), lambda m, x: m(x))
    trees_close(got, want, 1e-6)


class ScanLBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return LBlock()(x), None


class LStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        Scanned = nn.scan(
            ScanLBlock,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=L,
        )
        x, _ = Scanned(name="layers")(x, None)
        return x


def test_linen_scan_over_layers_trains_like_layer_by_layer():
    """nn.scan over L layers: one step equals the L blocks applied in turn with the
    scanned variables sliced per layer (measured difference 0)."""
    stack, one = LStack(), LBlock()
    x, t = data((B, N), seed=7)

    @jax.jit
    def run(x, t):
        v = stack.init(jax.random.key(0), x)
        new = linen_step(stack, v, x, t)
        inner = lambda tree: tree["layers"]["LBlock_0"]  # noqa: E731
        layers = [jax.tree.map(lambda a, i=i: a[i], {c: inner(v[c]) for c in v}) for i in range(L)]

        def seq_loss(ps):
            h, upds = x, []
            for p, lv in zip(ps, layers, strict=True):
                h, upd = one.apply({**lv, "params": p}, h, mutable=["batch_stats"])
                upds.append(upd)
            return mse(h, t), upds

        ps = [lv["params"] for lv in layers]
        g, upds = jax.grad(seq_loss, has_aux=True)(ps)
        seq = [
            {"params": jax.tree.map(lambda a, b: a - LR * b, p, gi), **u}
            for p, gi, u in zip(ps, g, upds, strict=True)
        ]
        return v, new, seq

    v, new, seq = run(x, t)
    updated(v["batch_stats"], new["batch_stats"])
    for i, s in enumerate(seq):
        got = jax.tree.map(lambda a, i=i: a[i], {c: new[c]["layers"]["LBlock_0"] for c in new})
        trees_close(got, s, 1e-6)


class LRemat(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
        cls = nn.remat(LBlock) if self.remat else LBlock
        return cls(name="block")(x)


def test_linen_remat_trains_like_without():
    """nn.remat around a block: the statistics are updated once per step and the step
    equals the one without remat (measured difference 4.5e-8)."""
    x, t = data((B, N), seed=8)
    a, b = LRemat(True), LRemat(False)

    @jax.jit
    def run(x, t):
        v = b.init(jax.random.key(0), x)
        return v, linen_step(a, v, x, t), linen_step(b, v, x, t)

    v, new_a, new_b = run(x, t)
    updated(v["batch_stats"], new_a["batch_stats"])
    assert int(new_a["batch_stats"]["block"]["BatchInhib_0"]["count"]) == 1
    trees_close(new_a, new_b, 1e-6)
