"""Linen modules: flax.linen.BatchNorm parity, running statistics (unbiased, cumulative,
masked), BatchInhib's eval map, Dropout, the autodiff switch, dtypes, serialization,
errors.

Tolerances (float32): outputs and gradients of O(1) agree with flax to 1e-5 absolute
(two different but equally accurate variance computations: round-off ~1e-7 relative,
amplified by 1/sqrt(var+eps) and summed over a batch of 16); running statistics to
1e-6 relative (the same EMA expression on statistics that differ by round-off).
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_batchinhib
from jax_batchinhib import linen as bnn
from jax_batchinhib.apps import models

ATOL = 1e-5  # float32 outputs/gradients of O(1), see the module docstring
RTOL_STATS = 1e-6  # float32 running statistics


OPT0 = {"xla_backend_optimization_level": 0}  # tiny programs: compiling is the cost


def run0(f, *args):
    """Run ``f(*args)`` as one jitted program (one compile instead of one per eager op)."""
    return jax.jit(f).lower(*args).compile(OPT0)(*args)


def close(a, b, atol=ATOL, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def batches(shape, k, seed=0, loc=1.5, scale=2.0):
    keys = jax.random.split(jax.random.key(seed), k)
    return [loc + scale * jax.random.normal(kk, shape) for kk in keys]


# ------------------------------------------------------------------ flax BatchNorm parity


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 3, 6)], ids=["dense", "nhwc"])
def test_batchnorm_interchangeable_with_flax(shape):
    """unbiased=False: same variables, outputs, running stats over 3 steps, gradients."""
    ours = bnn.BatchNorm(momentum=0.9, unbiased=False, scale_init=nn.initializers.normal(1.0))
    flx = nn.BatchNorm(
        momentum=0.9, use_fast_variance=False, scale_init=nn.initializers.normal(1.0)
    )
    xs = batches(shape, 3)
    w = jax.random.normal(jax.random.key(2), shape)

    def step(mdl, variables, x):
        def loss(params, x):
            y, upd = mdl.apply(
                {**variables, "params": params},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return jnp.sum(w * y**2), (y, upd)

        (_, (y, upd)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
        return y, g, {**variables, **upd}

    def trajectory(mdl, xs):
        v = mdl.init(jax.random.key(1), xs[0], use_running_average=False)
        out = [v]
        for x in xs:
            y, g, v = step(mdl, v, x)
            out.append((y, g, v["batch_stats"]))
        return out, mdl.apply(v, xs[0], use_running_average=True)

    (to, eo), (tf, ef) = run0(lambda xs: (trajectory(ours, xs), trajectory(flx, xs)), xs)
    vo, vf = to[0], tf[0]
    assert jax.tree.structure(vo) == jax.tree.structure(vf)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), vo) == jax.tree.map(
        lambda a: (a.shape, a.dtype), vf
    )
    jax.tree.map(np.testing.assert_array_equal, vo, vf)  # same init keys and values
    for (yo, go, so), (yf, gf, sf) in zip(to[1:], tf[1:], strict=True):
        close(yo, yf)
        jax.tree.map(lambda a, b: close(a, b, atol=1e-4 * float(jnp.abs(b).max())), go, gf)
        jax.tree.map(lambda a, b: close(a, b, atol=0, rtol=RTOL_STATS), so, sf)
    close(eo, ef)


def test_no_statistics_update_during_init_and_batch_of_one_init():
    x = batches((8, 3), 1)[0]
    v = run0(bnn.BatchNorm(use_running_average=False).init, jax.random.key(0), x)
    np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
    # flax's init accepts a single example; so does ours (inference form during init)
    v1 = run0(bnn.BatchInhib(use_running_average=False).init, jax.random.key(0), x[:1])
    assert v1["params"]["alpha"].shape == (3, 3)
    # its output is the inference form's, x / sqrt(1 + eps) with the initial statistics
    # (flax's is the training form's zeros); the variables are flax's (the docstring)
    mdl = bnn.BatchNorm(use_running_average=False, unbiased=False)
    (y1, v1), (yf, vf) = run0(
        lambda x: (
            mdl.init_with_output(jax.random.key(0), x),
            nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x),
        ),
        x[:1],
    )
    close(y1, x[:1] / np.sqrt(1 + 1e-5), atol=1e-6)
    np.testing.assert_array_equal(yf, np.zeros_like(yf))
    jax.tree.map(np.testing.assert_array_equal, v1, vf)


# ----------------------------------------------------------------- running statistics


def run_steps(mdl, xs, masks=None):
    """Init on xs[0], then one training step per batch; returns the variables."""

    def f(xs, masks):
        v = mdl.init(jax.random.key(0), xs[0], use_running_average=False)
        for i, x in enumerate(xs):
            m = None if masks is None else masks[i]
            _, upd = mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"], mask=m)
            v = {**v, **upd}
        return v

    return run0(f, xs, masks)


def test_unbiased_variance_and_cumulative_average():
    """momentum=None: E_B[mu_B] and m/(m-1) E_B[sigma_B^2] over the batches seen."""
    xs = batches((10, 4), 4)
    v = run_steps(bnn.BatchNorm(momentum=None, unbiased=True), xs)
    xn = np.stack([np.asarray(x, np.float64) for x in xs])
    close(v["batch_stats"]["mean"], xn.mean(axis=1).mean(0), atol=0, rtol=RTOL_STATS)
    close(v["batch_stats"]["var"], xn.var(axis=1, ddof=1).mean(0), atol=0, rtol=RTOL_STATS)
    np.testing.assert_array_equal(v["batch_stats"]["count"], np.full(4, 4))
    # a float momentum: the EMA, with biased / unbiased batch variance
    for unbiased, ddof in ((False, 0), (True, 1)):
        v = run_steps(bnn.BatchNorm(momentum=0.7, unbiased=unbiased), xs)
        mean, var = np.zeros(4), np.ones(4)
        for x in xn:
            mean = 0.7 * mean + 0.3 * x.mean(0)
            var = 0.7 * var + 0.3 * x.var(0, ddof=ddof)
        close(v["batch_stats"]["mean"], mean, atol=0, rtol=RTOL_STATS)
        close(v["batch_stats"]["var"], var, atol=0, rtol=RTOL_STATS)
        assert "count" not in v["batch_stats"]


def test_mask_excludes_rows_from_statistics_and_count():
    """Masked rows count nowhere: same statistics as the unmasked rows alone."""
    xs = batches((12, 3), 3, seed=3)
    keep = [np.arange(12) < k for k in (9, 12, 5)]
    for mdl in (
        bnn.BatchNorm(momentum=None),
        bnn.BatchCenter(momentum=None),
        bnn.BatchInhib(momentum=None),
    ):
        vm = run_steps(mdl, xs, masks=[jnp.asarray(k) for k in keep])
        vs = run_steps(mdl, [x[k] for x, k in zip(xs, keep, strict=True)])
        jax.tree.map(lambda a, b: close(a, b, atol=1e-6), vm["batch_stats"], vs["batch_stats"])
    # a feature with nothing counted in a batch keeps its statistics and its count
    mask = jnp.ones((12, 3), bool).at[:, 1].set(False)
    v = run_steps(bnn.BatchNorm(momentum=None), xs[:1], masks=[mask])
    np.testing.assert_array_equal(v["batch_stats"]["count"], [1, 0, 1])
    assert float(v["batch_stats"]["mean"][1]) == 0.0 and float(v["batch_stats"]["var"][1]) == 1.0


def test_batch_center_running_mean_and_eval():
    xs = batches((8, 5), 3, seed=4)
    mdl = bnn.BatchCenter(momentum=0.5, bias_init=nn.initializers.normal(1.0))
    v = run_steps(mdl, xs)
    mean = np.zeros(5)
    for x in xs:
        mean = 0.5 * mean + 0.5 * np.asarray(x).mean(0)
    close(v["batch_stats"]["mean"], mean, atol=0, rtol=RTOL_STATS)
    y, y_train = run0(
        lambda v, x: (
            mdl.apply(v, x, use_running_average=True),
            mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0],
        ),
        v,
        xs[0],
    )
    close(y, xs[0] - mean + v["params"]["bias"])
    close(y_train.mean(0), v["params"]["bias"])


# -------------------------------------------------------------------------- BatchInhib


def correlated(key, n_rows, n=8):
    """Rows of a fixed correlated Gaussian (positive correlations 0.3-0.9)."""
    a = jnp.eye(n) + 0.6 * jax.random.uniform(jax.random.key(42), (n, n))
    return 0.5 + jax.random.normal(key, (n_rows, n)) @ a


@pytest.mark.parametrize("groups", [1, 2])
def test_batch_inhib_eval_agrees_with_training_on_large_batch(groups):
    """Eval (fixed map from the running covariance, cumulative average over 6 batches of
    256) vs training mode on a batch of 4096 from the same distribution: within 2% (the
    sampling error of a covariance from ~1500 and 4096 rows is ~2-3% per entry, R
    averages it down)."""
    mdl = bnn.BatchInhib(momentum=None, groups=groups, alpha_init=nn.initializers.zeros)
    keys = jax.random.split(jax.random.key(7), 7)
    v = run_steps(mdl, [correlated(k, 256) for k in keys[:6]])
    x = correlated(keys[6], 4096)
    y_train, y_eval = run0(
        lambda v, x: (
            mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0],
            mdl.apply(v, x, use_running_average=True),
        ),
        v,
        x,
    )
    rel = float(jnp.linalg.norm(y_eval - y_train) / jnp.linalg.norm(y_train))
    assert rel < 0.02, rel
    # and the layer is far from the identity with alpha = 0, so the check has teeth
    assert float(jnp.linalg.norm(y_train - x) / jnp.linalg.norm(x)) > 0.3


def test_batch_inhib_default_init_is_near_identity_and_eval_identity_before_training():
    x = correlated(jax.random.key(1), 64, n=32)
    mdl = bnn.BatchInhib()
    v0 = bnn.BatchInhib(alpha_init=nn.initializers.zeros)

    def f(x):
        v = mdl.init(jax.random.key(0), x, use_running_average=False)
        y, _ = mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        # before any statistics the running covariance is I, so R = 0: eval is identity
        w = v0.init(jax.random.key(0), x, use_running_average=True)
        return v["params"]["alpha"], y, v0.apply(w, x, use_running_average=True)

    alpha, y, y_eval0 = run0(f, x)
    np.testing.assert_array_equal(alpha, np.full((32, 32), -12.0))
    # documented bound: sum_k |R_ik| <= (g/guard)^2 (sum_{l != i} |r_il|)^2
    cov = np.cov(np.asarray(x, np.float64).T, ddof=0)  # the biased batch covariance
    r = np.abs(cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov))))
    bound = (np.log1p(np.exp(-12.0)) / 1e-3) ** 2 * ((r.sum(1) - 1) ** 2).max()
    R = jax_batchinhib.inhibition_matrix(jnp.asarray(cov, jnp.float32), alpha)[0]
    assert 0.1 * bound < float(jnp.abs(R).sum(1).max()) <= bound * (1 + 1e-3)
    assert bound < 0.04  # 32 features correlated at ~0.9: about 3% at most
    assert float(jnp.linalg.norm(y - x) / jnp.linalg.norm(x)) < bound
    close(y_eval0, x, atol=0, rtol=0)


def test_batch_inhib_running_covariance_is_unbiased_batch_covariance():
    xs = batches((20, 6), 3, seed=5)
    v = run_steps(bnn.BatchInhib(momentum=None, groups=3), xs)
    xn = np.stack([np.asarray(x, np.float64) for x in xs])
    covs = np.stack([np.cov(x.T, ddof=1) for x in xn]).mean(0)
    want = np.stack([covs[2 * g : 2 * g + 2, 2 * g : 2 * g + 2] for g in range(3)])
    close(v["batch_stats"]["cov"], want, atol=1e-5)
    close(v["batch_stats"]["var"], np.diag(covs), atol=1e-5)
    assert v["batch_stats"]["count"].shape == () and int(v["batch_stats"]["count"]) == 3


# ------------------------------------------------------------------ Dropout, autodiff


def test_dropout_matches_flax_mask_and_gradient():
    x = batches((4, 6), 1)[0]
    rng = {"dropout": jax.random.key(3)}
    ours = bnn.Dropout(0.5, deterministic=False)
    y = ours.apply({}, x, rngs=rng)
    close(y, nn.Dropout(0.5, deterministic=False).apply({}, x, rngs=rng), atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(ours.apply({}, x, rngs=rng)))(x)
    close(g, jnp.where(y != 0, 2.0, 0.0), atol=0)
    # deterministic=None at the call falls back to the attribute (False): the same mask
    close(ours.apply({}, x, deterministic=None, rngs=rng), y, atol=0)
    close(bnn.Dropout(0.5).apply({}, x, deterministic=True), x, atol=0)


@pytest.mark.parametrize(
    "mdl",
    [
        bnn.BatchNorm(use_running_average=False, scale_init=nn.initializers.normal(1.0)),
        bnn.BatchCenter(use_running_average=False),
        bnn.BatchInhib(use_running_average=False, alpha_init=nn.initializers.normal(1.0)),
    ],
    ids=["bn", "center", "inhib"],
)
def test_use_autodiff_switch(mdl):
    """Same values and gradients either way; forward mode only with use_autodiff=True."""
    x = correlated(jax.random.key(2), 16, n=4)
    v = run0(mdl.init, jax.random.key(0), x)
    auto = mdl.clone(use_autodiff=True)

    def f(m, params, x):
        y, _ = m.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    t = jnp.ones_like(x)

    def both(params, x):
        va, ga = jax.value_and_grad(lambda p, x: f(mdl, p, x), argnums=(0, 1))(params, x)
        vb, gb = jax.value_and_grad(lambda p, x: f(auto, p, x), argnums=(0, 1))(params, x)
        _, jv = jax.jvp(lambda x: f(auto, params, x), (x,), (t,))
        return va, ga, vb, gb, jv

    va, ga, vb, gb, jv = run0(both, v["params"], x)
    close(va, vb)
    jax.tree.map(lambda a, b: close(a, b, atol=1e-5), ga, gb)
    close(jv, jnp.sum(gb[1] * t), atol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jit(lambda x: jax.jvp(lambda x: f(mdl, v["params"], x), (x,), (t,))).lower(x)


# ------------------------------------------------------------------------------ dtypes


def init_apply(mdl, x):
    v = mdl.init(jax.random.key(0), x, use_running_average=False)
    return v, mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])


def test_dtype_policy_like_flax():
    x = batches((8, 3), 1)[0].astype(jnp.bfloat16)
    for mdl, ref in (
        (bnn.BatchNorm(unbiased=False), nn.BatchNorm(use_fast_variance=False)),
        (bnn.BatchNorm(dtype=jnp.bfloat16), nn.BatchNorm(dtype=jnp.bfloat16)),
        (bnn.BatchNorm(param_dtype=jnp.bfloat16), nn.BatchNorm(param_dtype=jnp.bfloat16)),
    ):
        v, (y, upd), vr, (yr, _) = run0(
            lambda x, m=mdl, r=ref: init_apply(m, x) + init_apply(r, x), x
        )
        assert jax.tree.map(lambda a: a.dtype, v) == jax.tree.map(lambda a: a.dtype, vr)
        assert y.dtype == yr.dtype
        assert upd["batch_stats"]["var"].dtype == jnp.float32  # statistics >= float32
        close(y.astype(jnp.float32), yr.astype(jnp.float32), atol=2e-2)  # bfloat16: 8 bits
    for mdl in (bnn.BatchCenter(), bnn.BatchInhib()):
        _, (y, upd) = jax.eval_shape(lambda x, m=mdl: init_apply(m, x), x)
        assert y.dtype == jnp.float32 and upd["batch_stats"]["mean"].dtype == jnp.float32


def test_statistics_stay_float32_with_bfloat16_params_and_no_forced_reductions():
    """param_dtype=bfloat16 with force_float32_reductions=False stored the running
    statistics in bfloat16, where a moving average stalls: the mean stuck at 65 for data
    of mean 100 after 500 steps, and eval outputs were 38 standard deviations off. They
    are float32 now, as flax's (linen and NNX), and follow flax's running mean to
    float32 round-off of the bfloat16-rounded parameters' run (1e-3 relative)."""
    from flax import nnx

    from jax_batchinhib import nnx as bnx

    xs = 100.0 + jax.random.normal(jax.random.key(0), (300, 16, 2))
    kw = dict(param_dtype=jnp.bfloat16, force_float32_reductions=False)
    means = []
    for mdl in (nn.BatchNorm(**kw), bnn.BatchNorm(unbiased=False, **kw)):
        v = mdl.init(jax.random.key(1), xs[0], use_running_average=False)

        # a Python loop, not a scan: flax.linen's statistics start in bfloat16 and turn
        # float32 at the first update, which a scan's carry does not allow
        step = jax.jit(
            lambda v, x, mdl=mdl: mdl.apply(
                v, x, use_running_average=False, mutable=["batch_stats"]
            )[1]
        )
        for x in xs:
            v = {**v, **step(v, x)}
        means.append(v["batch_stats"]["mean"])
    assert means[1].dtype == jnp.float32, means[1].dtype
    np.testing.assert_allclose(means[1], means[0], rtol=1e-3)  # measured: equal
    assert float(jnp.min(means[1])) > 90.0, means  # 1 - 0.99**300 = 95% of the way
    bn = bnx.BatchNorm(2, rngs=nnx.Rngs(0), **kw)
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda b: bnn.BatchNorm(
            scale_init=b(nn.initializers.ones), bias_init=b(nn.initializers.zeros)
        ),
        lambda b: bnn.BatchCenter(bias_init=b(nn.initializers.zeros)),
        lambda b: bnn.BatchInhib(alpha_init=b(bnn.near_identity_alpha_init(), 2)),
        lambda b: bnn.IterNorm(scale_init=b(nn.initializers.ones)),
        lambda b: bnn.ZCANorm(bias_init=b(nn.initializers.zeros)),
    ],
    ids=["BatchNorm", "BatchCenter", "BatchInhib", "IterNorm", "ZCANorm"],
)  # fmt: skip
def test_partitioned_initializers_apply_like_flax(make):
    """Parameters boxed by nn.with_partitioning (flax's sharding annotations): init gives
    the partition specs, and apply works on the boxed variables as on unboxed ones (the
    shape check read the box, shape (), and refused every apply)."""

    def boxed(init, ndim=1):
        return nn.with_partitioning(init, ("model",) + (None,) * (ndim - 1))

    mdl = make(boxed)
    x = batches((8, 4), 2)[0]
    v = mdl.init(jax.random.key(0), x, use_running_average=False)
    pspec = jax.sharding.PartitionSpec
    specs = jax.tree.leaves(
        nn.get_partition_spec(v)["params"], is_leaf=lambda p: isinstance(p, pspec)
    )
    assert any(len(p) and p[0] == "model" for p in specs), specs  # the boxed one
    y, _ = mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y0, _ = mdl.apply(nn.meta.unbox(v), x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y0)


# ----------------------------------------------------------------------- serialization


def test_serialization_round_trip_and_checkpoint_moves_to_flax_and_back():
    """Train our MLP(unbiased=False) a few steps; its bytes restore into the same MLP and
    into the MLP built on flax.linen.BatchNorm with identical eval outputs, and back."""
    x = batches((16, 12), 1)[0]
    ours = models.MLP(features=(8,), num_classes=3, norm="batchnorm", unbiased=False)
    flx = models.MLP(features=(8,), num_classes=3, norm="flax_batchnorm")

    def train(xs):
        v = ours.init(jax.random.key(0), x, train=False)
        for xb in xs:
            _, upd = ours.apply(v, xb, train=True, mutable=["batch_stats"])
            v = {**v, **upd}
        return jax.tree.map(lambda a: a + 0.1, v)  # non-default params, too

    v = run0(train, batches((16, 12), 3, seed=9))
    blob = flax.serialization.to_bytes(v)
    template = jax.jit(flx.init, static_argnames="train")(jax.random.key(5), x, train=False)
    vf = flax.serialization.from_bytes(template, blob)
    y_ours, y_flax = run0(
        lambda v, vf: (ours.apply(v, x, train=False), flx.apply(vf, x, train=False)), v, vf
    )
    np.testing.assert_array_equal(
        flax.serialization.to_state_dict(vf)["batch_stats"]["bn0"]["var"],
        v["batch_stats"]["bn0"]["var"],
    )
    close(y_flax, y_ours, atol=1e-6)
    # and back, through the state dict
    vb = flax.serialization.from_state_dict(
        jax.eval_shape(lambda: ours.init(jax.random.key(6), x, train=False)),
        flax.serialization.to_state_dict(vf),
    )
    jax.tree.map(np.testing.assert_array_equal, vb, v)
    # every module's state (params and batch_stats, count included) round-trips
    for mdl in (bnn.BatchNorm(momentum=None), bnn.BatchCenter(), bnn.BatchInhib(groups=2)):
        w = run_steps(mdl, batches((8, 4), 2))
        back = flax.serialization.from_bytes(
            jax.eval_shape(
                lambda m=mdl: m.init(jax.random.key(1), x[:, :4], use_running_average=False)
            ),
            flax.serialization.to_bytes(w),
        )
        jax.tree.map(np.testing.assert_array_equal, back, w)


# ------------------------------------------------------------------------------ errors


def raises(match, fn, exc=(ValueError, TypeError)):
    """The error is raised at trace time: tracing and lowering (no compile) is enough."""
    with pytest.raises(exc, match=match):
        jax.jit(fn).lower()


def test_errors_name_the_module_and_the_argument():
    x = batches((8, 6), 1)[0]
    k = jax.random.key(0)
    raises(
        r"BatchNorm: use_running_average was given nowhere",
        lambda: bnn.BatchNorm().init(k, x),
    )
    raises(
        r"BatchCenter: use_running_average was given both",
        lambda: bnn.BatchCenter(use_running_average=True).init(k, x, use_running_average=True),
    )
    raises(r"Dropout: deterministic was given nowhere", lambda: bnn.Dropout(0.5).init(k, x))
    raises(
        r"BatchInhib: groups=4 must divide the number of features N=6",
        lambda: bnn.BatchInhib(use_running_average=False, groups=4).init(k, x),
    )
    v = run0(bnn.BatchInhib(use_running_average=False).init, k, x)
    raises(
        r"BatchInhib: params/alpha has shape \(6, 6\), but x with 4 features needs \(4, 4\)",
        lambda: bnn.BatchInhib(use_running_average=False).apply(
            v, x[:, :4], mutable=["batch_stats"]
        ),
    )
    v = run0(bnn.BatchNorm(use_running_average=True).init, k, x)
    raises(
        r"BatchNorm: batch_stats/mean has shape \(6,\), but x with 5 features",
        lambda: bnn.BatchNorm(use_running_average=True).apply(v, x[:, :5]),
    )
    raises(
        r"BatchNorm: momentum must be a float in \[0, 1\] or None",
        lambda: bnn.BatchNorm(use_running_average=False, momentum=1.5).init(k, x),
    )
    raises(
        r"BatchNorm: axis must be an int",
        lambda: bnn.BatchNorm(use_running_average=False, axis=1.5).init(k, x),
    )
    raises(
        r"BatchInhib: correlation must be one of",
        lambda: bnn.BatchInhib(use_running_average=False, correlation="x").init(k, x),
    )
    raises(
        r"Dropout: broadcast_dims \(5,\) has axis 5, out of range",
        lambda: bnn.Dropout(0.5, broadcast_dims=(5,), deterministic=False).init(k, x),
    )
    raises(r"Dropout: rate must be a float in \[0, 1\]", lambda: bnn.Dropout(2.0).init(k, x))
    raises(
        r"BatchNorm: x must be a floating-point array",
        lambda: bnn.BatchNorm(use_running_average=True).init(k, jnp.ones((4, 3), jnp.complex64)),
    )
    raises(
        r"MLP: norm must be one of",
        lambda: models.MLP(norm="layernorm").init(k, x, train=False),
    )
    # a named submodule is named in the message
    raises(
        r"BatchNorm 'layers_0': use_running_average was given nowhere",
        lambda: nn.Sequential([bnn.BatchNorm()]).init(k, x),
    )
