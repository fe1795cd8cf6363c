"""Branches a user reaches that the other test files do not: folding layers without bias
or scale, with the relative guard and from NNX; BatchNorm without scale/bias, with
float32 reductions off, on a feature axis other than the last; Dropout's ``rng`` and
``rng_collection``; NNX ``use_autodiff``; NnxCNN; BatchInhib's options through the
modules (and the relative guard's default delta); ghost-batch gradients against
autodiff of the reference; ``check_vjp``'s failure report; a short run of the
``batchnorm+inhib_a0_rel`` training variant that the README's table reports.

Small shapes, float64 where an equality is exact up to round-off (tolerances: ten times
the measured error, written beside each)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_batchinhib as jb
from jax_batchinhib import fold
from jax_batchinhib import linen as bl
from jax_batchinhib import nnx as bx
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import VJPMismatch, check_vjp

N = 6


def _x(shape=(16, N), seed=0, dtype=jnp.float32):
    k = jax.random.key(seed)
    mix = jnp.eye(shape[-1]) + 0.5 * jax.random.normal(jax.random.key(99), (shape[-1],) * 2)
    return (jax.random.normal(k, shape) @ mix.astype(jnp.float32) + 1.5).astype(dtype)


def _stats(n=N, seed=5):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"mean": jax.random.normal(k1, (n,)), "var": jnp.exp(jax.random.normal(k2, (n,)))}


# -------------------------------------------------------------------------------- fold


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("bn_bias", [True, False])
def test_fold_batch_norm_into_a_dense_without_bias(use_scale, bn_bias):
    """What the example models build before every norm: Dense(use_bias=False) ->
    BatchNorm, also without BatchNorm's scale and/or bias."""
    x = _x()
    dense = nn.Dense(N, use_bias=False)
    bn = bl.BatchNorm(use_running_average=True, use_scale=use_scale, use_bias=bn_bias)
    dv = dense.init(jax.random.key(1), x)
    bv = bn.init(jax.random.key(2), x)
    params = jax.tree.map(lambda a: a + 0.3, bv.get("params", {}))
    assert set(params) == {k for k, on in (("scale", use_scale), ("bias", bn_bias)) if on}
    variables = {"params": params, "batch_stats": _stats()}
    want = bn.apply(variables, dense.apply(dv, x))
    p = fold.fold_batch_norm(dv["params"], params, variables["batch_stats"], epsilon=bn.epsilon)
    got = nn.Dense(N).apply({"params": p}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32; measured 1e-6


def test_fold_batch_center_without_bias_on_either_side():
    x = _x()
    dense = nn.Dense(N, use_bias=False)
    bc = bl.BatchCenter(use_running_average=True, use_bias=False)
    dv = dense.init(jax.random.key(1), x)
    st = {"mean": _stats()["mean"]}
    want = bc.apply({"batch_stats": st}, dense.apply(dv, x))
    p = fold.fold_batch_center(dv["params"], {}, st)
    np.testing.assert_allclose(nn.Dense(N).apply({"params": p}, x), want, atol=1e-5)


def _cov(n=N, seed=7):
    a = jax.random.normal(jax.random.key(seed), (3 * n, n))
    return a.T @ a / (3 * n)  # (N, N): groups=1


@pytest.mark.parametrize(
    "kw",
    [
        dict(guard_mode="relative"),
        dict(guard_mode="relative", guard=0.2, correlation="variance"),
        dict(denominator="abs", rho=3.0, epsilon=1e-3),
    ],
    ids=str,
)
def test_fold_batch_inhib_with_the_module_options(kw):
    """fold.inhib_options reads every option off the module, the relative guard too."""
    x = _x()
    dense = nn.Dense(N, use_bias=False)
    inhib = bl.BatchInhib(use_running_average=True, alpha_init=nn.initializers.zeros, **kw)
    dv = dense.init(jax.random.key(1), x)
    iv = inhib.init(jax.random.key(2), x)
    stats = {**iv["batch_stats"], "cov": _cov()}
    variables = {"params": iv["params"], "batch_stats": stats}
    want = inhib.apply(variables, dense.apply(dv, x))
    opts = fold.inhib_options(inhib)
    assert {k: opts[k] for k in kw} == kw
    p = fold.fold_batch_inhib_after(dv["params"], iv["params"], stats, **opts)
    np.testing.assert_allclose(nn.Dense(N).apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)
    # before the next layer, too
    head = nn.Dense(3)
    hv = head.init(jax.random.key(3), x)
    p2 = fold.fold_batch_inhib_before(hv["params"], iv["params"], stats, **opts)
    z = dense.apply(dv, x)  # the BatchInhib's input
    np.testing.assert_allclose(
        nn.Dense(3).apply({"params": p2}, z), head.apply(hv, want), rtol=1e-5, atol=1e-5
    )


def test_fold_from_nnx_state():
    """NNX variables, converted with ``.to_pure_dict()``, fold as linen's do."""
    x = _x()
    lin = nnx.Linear(N, N, use_bias=False, rngs=nnx.Rngs(0))
    bn = bx.BatchNorm(N, rngs=nnx.Rngs(1))
    bn.mean[...], bn.var[...] = _stats()["mean"], _stats()["var"]
    bn.scale[...] = bn.scale[...] + 0.5
    bn.eval()
    want = bn(lin(x))
    lp = nnx.to_pure_dict(nnx.state(lin, nnx.Param))
    bp = nnx.to_pure_dict(nnx.state(bn, nnx.Param))
    bs = nnx.to_pure_dict(nnx.state(bn, nnx.BatchStat))
    p = fold.fold_batch_norm(lp, bp, bs, epsilon=bn.epsilon)
    np.testing.assert_allclose(nn.Dense(N).apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- module options


def test_batch_norm_without_scale_and_bias_is_the_plain_op():
    x = _x()
    m = bl.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    y, v = m.init_with_output(jax.random.key(0), x)
    assert "params" not in v or not v["params"]
    want, _ = ref.batch_norm(x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("force", [True, False])
def test_statistics_are_float32_whatever_force_float32_reductions(force):
    """bfloat16 parameters: the statistics are float32 with the flag either way (False
    stored them in bfloat16, where a moving average stalls; test_linen.py
    test_statistics_stay_float32_with_bfloat16_params_and_no_forced_reductions)."""
    x = _x(dtype=jnp.bfloat16)
    m = bl.BatchNorm(
        use_running_average=False, param_dtype=jnp.bfloat16, force_float32_reductions=force
    )
    _, v = m.init_with_output(jax.random.key(0), x)
    _, upd = m.apply(v, x, mutable=["batch_stats"])
    want = jnp.float32
    assert upd["batch_stats"]["mean"].dtype == want
    assert upd["batch_stats"]["var"].dtype == want
    n = bx.BatchNorm(N, param_dtype=jnp.bfloat16, force_float32_reductions=force, rngs=nnx.Rngs(0))
    n(x)
    assert n.mean[...].dtype == want


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchCenter", "BatchInhib"])
def test_module_axis_other_than_last(kind):
    """axis=1 on (B, N, S) is axis=-1 on the transposed input, statistics included."""
    x = _x((8, 3, N), seed=1)  # features last here
    xt = jnp.swapaxes(x, 1, 2)  # (8, N, 3): features on axis 1
    last = getattr(bl, kind)(use_running_average=False)
    first = getattr(bl, kind)(use_running_average=False, axis=1)
    v = last.init(jax.random.key(0), x)
    y, s = last.apply(v, x, mutable=["batch_stats"])
    yt, st = first.apply(v, xt, mutable=["batch_stats"])
    np.testing.assert_allclose(jnp.swapaxes(yt, 1, 2), y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(s), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_rng_argument_and_rng_collection():
    x = _x()
    k = jax.random.key(4)
    # the same mask as flax.linen.Dropout with the same collection, or the same rng
    want = nn.Dropout(0.3, deterministic=False, rng_collection="noise").apply(
        {}, x, rngs={"noise": k}
    )
    got = bl.Dropout(0.3, deterministic=False, rng_collection="noise").apply(
        {}, x, rngs={"noise": k}
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    want = nn.Dropout(0.3, deterministic=False).apply({}, x, rng=k)
    got = bl.Dropout(0.3, deterministic=False).apply({}, x, rng=k)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, jnp.where(jax.random.bernoulli(k, 0.7, x.shape), x / 0.7, 0))
    with pytest.raises(Exception, match="noise"):  # the collection it asks for is named
        bl.Dropout(0.3, deterministic=False, rng_collection="noise").apply(
            {}, x, rngs={"dropout": k}
        )


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchCenter", "BatchInhib"])
def test_nnx_use_autodiff_gives_the_hand_derived_gradient(kind):
    x = _x(seed=2)

    def grads(use_autodiff):
        kw = dict(alpha_init=nnx.initializers.normal(1.0)) if kind == "BatchInhib" else {}
        m = getattr(bx, kind)(N, use_autodiff=use_autodiff, rngs=nnx.Rngs(0), **kw)
        # nnx.grad: the module's parameters and the input; the running statistics update
        # inside as in training
        return nnx.grad(lambda m, x: jnp.sum(jnp.tanh(m(x))), argnums=(0, 1))(m, x)

    hand, auto = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(hand), jax.tree.leaves(auto), strict=True):
        # float32; measured 2e-7 relative to the largest gradient
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_nnx_cnn_trains_and_evaluates():
    from jax_batchinhib.apps.models import NnxCNN

    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
    y = jnp.arange(8) % 10
    m = NnxCNN(1, (4,), norm="batchnorm+inhib", rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, __import__("optax").adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean(jb.softmax_cross_entropy(m(x), jax.nn.one_hot(y, 10)))

    m.train()
    first = float(loss_fn(m))
    for _ in range(5):
        _, g = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, g)
    assert float(loss_fn(m)) < first
    m.eval()
    out = m(x)
    assert out.shape == (8, 10) and bool(jnp.all(jnp.isfinite(out)))


# ------------------------------------------------------- BatchInhib options in modules


@pytest.mark.parametrize(
    "kw",
    [
        dict(correlation="variance"),
        dict(denominator="abs"),
        dict(guard=0.05),
        dict(guard_mode="relative"),
        dict(guard_mode="relative", guard=0.2, epsilon=1e-3),
    ],
    ids=str,
)
def test_batch_inhib_module_options_reach_the_op(kw):
    """linen and NNX BatchInhib with each option give the reference's output and
    gradient with the same options (float64: exact up to round-off)."""
    with jax.enable_x64(True):
        x = _x((24, N), seed=3, dtype=jnp.float64)
        m = bl.BatchInhib(
            use_running_average=False,
            param_dtype=jnp.float64,
            alpha_init=nn.initializers.normal(1.0),
            **kw,
        )
        v = m.init(jax.random.key(0), x)
        alpha = v["params"]["alpha"]

        def ours(a, x):
            return m.apply({**v, "params": {"alpha": a}}, x, mutable=["batch_stats"])[0]

        def theirs(a, x):
            return ref.batch_inhib(x, a, **kw)[0]

        ct = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
        yo, vo = jax.vjp(ours, alpha, x)
        yt, vt = jax.vjp(theirs, alpha, x)
        np.testing.assert_allclose(yo, yt, rtol=1e-12, atol=1e-12)  # measured ~1e-15
        for a, b in zip(vo(ct), vt(ct), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)  # measured ~1e-14
        n = bx.BatchInhib(N, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kw)
        n.alpha[...] = alpha
        np.testing.assert_allclose(n(x), yt, rtol=1e-12, atol=1e-12)


def test_relative_guard_default_delta():
    """guard=None with guard_mode="relative" is delta = 0.5 (docs/derivations.md),
    through the op and the module; another delta gives another output."""
    with jax.enable_x64(True):
        x = _x((24, N), seed=4, dtype=jnp.float64)
        alpha = jax.random.normal(jax.random.key(2), jb.alpha_shape(N, 1), jnp.float64)
        y_default = jb.batch_inhib(x, alpha, guard_mode="relative")[0]
        y_half = ref.batch_inhib(x, alpha, guard_mode="relative", guard=0.5)[0]
        y_other = ref.batch_inhib(x, alpha, guard_mode="relative", guard=0.1)[0]
        np.testing.assert_allclose(y_default, y_half, rtol=1e-12, atol=1e-12)
        assert float(jnp.max(jnp.abs(y_default - y_other))) > 1e-3
        m = bl.BatchInhib(use_running_average=False, guard_mode="relative", param_dtype=jnp.float64)
        v = m.init(jax.random.key(0), x)
        v = {**v, "params": {"alpha": alpha.reshape(v["params"]["alpha"].shape)}}
        y_mod = m.apply(v, x, mutable=["batch_stats"])[0]
        np.testing.assert_allclose(y_mod, y_half, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------- ghost batches against autodiff


@pytest.mark.parametrize("op", ["batch_norm", "batch_center", "batch_inhib"])
def test_ghost_batch_gradients_equal_autodiff_of_the_reference(op):
    """virtual_batch_size=v against jax.vjp of the reference applied to each run of v
    examples (reshape to (B/v, v, ...), vmap the reference, reshape back)."""
    v = 4
    with jax.enable_x64(True):
        x = _x((16, N), seed=6, dtype=jnp.float64)
        if op == "batch_norm":
            params = (jnp.linspace(0.5, 1.5, N), jnp.linspace(-1, 1, N))
        elif op == "batch_center":
            params = (jnp.linspace(-1, 1, N),)
        else:
            params = (jax.random.normal(jax.random.key(3), jb.alpha_shape(N, 1), jnp.float64),)

        def ours(x, *p):
            return getattr(jb, op)(x, *p, virtual_batch_size=v)[0]

        def theirs(x, *p):
            sub = jax.vmap(lambda xs: getattr(ref, op)(xs, *p)[0])
            return sub(x.reshape(-1, v, N)).reshape(x.shape)

        ct = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
        yo, fo = jax.vjp(ours, x, *params)
        yt, ft = jax.vjp(theirs, x, *params)
        np.testing.assert_allclose(yo, yt, rtol=1e-12, atol=1e-12)  # measured ~1e-15
        for a, b in zip(fo(ct), ft(ct), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)  # measured ~1e-14


# ------------------------------------------------------------------- check_vjp report


def test_check_vjp_raises_with_a_table_naming_the_input():
    @jax.custom_vjp
    def wrong_softmax(x):
        return jax.nn.softmax(x)

    def fwd(x):
        y = jax.nn.softmax(x)
        return y, y

    def bwd(y, g):
        return (y * g,)  # the diagonal of the Jacobian only: wrong

    wrong_softmax.defvjp(fwd, bwd)
    x = _x((4, 5))
    with pytest.raises(VJPMismatch) as err:
        check_vjp(wrong_softmax, ref.softmax, x)
    assert "x" in err.value.errors and not err.value.errors["x"].ok
    assert err.value.errors["output"].ok  # the forward agrees; only the rule is wrong
    assert "x" in str(err.value) and "e-" in str(err.value)  # the table of errors
    errs = check_vjp(wrong_softmax, ref.softmax, x, raise_on_error=False)
    assert errs["x"].max_rel > 1e-2


# -------------------------------------------------------- the README's training variant


def test_the_relative_guard_variant_trains():
    """``batchnorm+inhib_a0_rel`` (full-strength BatchInhib, relative guard): two short
    epochs on digits with one seed learn (the README's table reports its full run)."""
    pytest.importorskip("sklearn")
    from jax_batchinhib.apps import train
    from jax_batchinhib.apps.data import load_digits_split

    r = train.train_variant(
        "batchnorm+inhib_a0_rel", load_digits_split(), epochs=2, seeds=1, batch_size=128, lr=3e-3
    )
    loss = np.asarray(r["curves"]["train_loss"])
    assert np.all(np.isfinite(loss)) and loss[0, -1] < loss[0, 0]
    assert r["test_acc_mean"] > 0.5  # chance is 0.1; measured 0.9 after two epochs
