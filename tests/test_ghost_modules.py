"""Ghost batches (``virtual_batch_size``) in the Flax modules, linen and NNX.

What is shown:

- training mode: a module with ``virtual_batch_size=v`` gives the output, the gradient
  of x and the running statistics that one gets by applying the op to each sub-batch of
  ``v`` rows and averaging the sub-batches' statistics, each variance (and covariance)
  unbiased with the count of ONE sub-batch, ``m = v * positions`` (not the full batch's);
  with a mask, with each sub-batch's own count, and a sub-batch with no valid row left
  out of the average; under shard_map with ``axis_name``, the
  j-th sub-batch of every device forms one group, ``m = v * positions * devices``;
- linen and NNX agree (same output, same statistics);
- eval mode ignores ``virtual_batch_size`` (a batch it does not divide is fine);
- errors name the module and the argument.

Everything is float64: the expected values are composed from op calls in a different
order than the module computes them, so they agree to round-off, rtol=1e-10, atol=1e-12.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import linen as bl
from jax_batchinhib import nnx as bx
from jax_batchinhib import parallel

RTOL, ATOL = 1e-10, 1e-12  # float64 round-off
B, S, N = 16, 2, 4  # batch, one spatial axis, features
V = 4  # virtual batch size: 4 sub-batches
MOM = 0.5  # momentum: the batch statistics weigh half in the update

KINDS = ["BatchNorm", "BatchCenter", "BatchInhib"]
STATS = {
    "BatchNorm": ("mean", "var"),
    "BatchCenter": ("mean",),
    "BatchInhib": ("mean", "var", "cov"),
}


def close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=RTOL, atol=ATOL)


def data():
    kx, kc = jax.random.split(jax.random.key(3))
    mix = jnp.array(
        [[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, 0.4, 0.0], [0.3, 0.0, 1.0, 0.5], [0.0, 0.2, 0.0, 1.0]]
    )
    x = jax.random.normal(kx, (B, S, N), jnp.float64) @ mix + jnp.array([2.0, -1.0, 0.5, 3.0])
    x = x * jnp.linspace(0.5, 2.0, B)[:, None, None]  # sub-batches with different spreads
    ct = jax.random.normal(kc, (B, S, N), jnp.float64)
    return x, ct


def alpha_init(key, shape, dtype):
    """Deterministic, so linen and NNX hold the same alpha."""
    del key
    return 0.05 * jnp.reshape(jnp.arange(np.prod(shape), dtype=dtype), shape) / np.prod(shape)


def options(kind, **kw):
    kw = dict(momentum=MOM, param_dtype=jnp.float64, **kw)
    if kind == "BatchInhib":
        kw.update(groups=2, alpha_init=alpha_init)
    return kw


def params_of(kind):
    """The modules' initial parameters (defaults: scale 1, bias 0; alpha above)."""
    if kind == "BatchNorm":
        return {"scale": jnp.ones(N, jnp.float64), "bias": jnp.zeros(N, jnp.float64)}
    if kind == "BatchCenter":
        return {"bias": jnp.zeros(N, jnp.float64)}
    return {"alpha": alpha_init(None, (2, N // 2, N // 2), jnp.float64)}


def op(kind, x, p, **kw):
    if kind == "BatchNorm":
        return jb.batch_norm(x, p["scale"], p["bias"], **kw)
    if kind == "BatchCenter":
        return jb.batch_center(x, p["bias"], **kw)
    return jb.batch_inhib(x, p["alpha"], groups=2, **kw)


def initial_stats(kind):
    eye = jnp.broadcast_to(jnp.eye(N // 2), (2, N // 2, N // 2))
    init = {"mean": jnp.zeros(N), "var": jnp.ones(N), "cov": eye}
    return {k: init[k] for k in STATS[kind]}


def expected(kind, x, ct, mask=None, m_of=None):
    """By hand: the op on each sub-batch of V rows; y concatenated; statistics averaged
    over the sub-batches, var/cov times m/(m-1) with m the sub-batch's count (V * S
    without a mask, ``m_of(j)`` with one; a sub-batch with m = 0 is left out of the
    average); the EMA update from the initial statistics.
    Also dx of sum(y * ct)."""
    p = params_of(kind)

    def y_of(x):
        ys, sts = [], []
        for j in range(B // V):
            sl = slice(j * V, (j + 1) * V)
            y, st = op(kind, x[sl], p, mask=None if mask is None else mask[sl])
            m = V * S if m_of is None else m_of(j)
            ys.append(y)
            if m == 0:  # an empty sub-batch has no statistics: left out of the average
                continue
            f = m / (m - 1)
            st = {"mean": st.mean, "var": st.var, "cov": getattr(st, "cov", None)}
            st = {k: st[k] if k == "mean" else st[k] * f for k in STATS[kind]}
            sts.append(st)
        batch = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *sts)
        return jnp.concatenate(ys), batch

    (y, batch), vjp = jax.vjp(y_of, x)
    (dx,) = vjp((ct, jax.tree.map(jnp.zeros_like, batch)))
    init = initial_stats(kind)
    new = {k: MOM * init[k] + (1 - MOM) * batch[k] for k in STATS[kind]}
    return y, new, dx


# ------------------------------------------------------- the modules, one jit per case


@functools.cache
def linen_train(kind, v, masked=False):
    mdl = getattr(bl, kind)(**options(kind, virtual_batch_size=v))

    @jax.jit
    def f(x, ct, mask):
        variables = mdl.init(jax.random.key(0), x, use_running_average=False)

        def loss(x):
            y, upd = mdl.apply(
                variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
            )
            return jnp.sum(y * ct), (y, upd["batch_stats"])

        dx, (y, stats) = jax.grad(loss, has_aux=True)(x)
        return y, dict(stats), dx

    return f


@nnx.jit
def nnx_step(mdl, x, ct):
    def loss(mdl, x):
        y = mdl(x)
        return jnp.sum(y * ct), y

    dx, y = nnx.grad(loss, argnums=1, has_aux=True)(mdl, x)
    return y, {k: getattr(mdl, k)[...] for k in mdl._stat_names}, dx


def nnx_train(kind, v):
    mdl = getattr(bx, kind)(N, **options(kind, virtual_batch_size=v), rngs=nnx.Rngs(0))
    return lambda x, ct: nnx_step(mdl, x, ct)


@pytest.mark.parametrize("kind", KINDS)
def test_modules_equal_the_op_per_sub_batch(kind):
    """linen and NNX with virtual_batch_size=V: y, dx and the updated running statistics
    equal the op applied per sub-batch (statistics averaged, each unbiased with the
    sub-batch count m = V * S); and the statistics are not those of the full batch."""
    with jax.enable_x64(True):
        x, ct = data()
        want = expected(kind, x, ct)
        got_linen = linen_train(kind, V)(x, ct, None)
        close(got_linen, want)
        got_nnx = nnx_train(kind, V)(x, ct)
        close(got_nnx, want)
        # the test can fail: without ghost batches the output differs, and so does the
        # variance (the mean of equal sub-batch means is the batch mean: equal there)
        y_full, st_full, _ = linen_train(kind, None)(x, ct, None)
        assert np.max(np.abs(np.asarray(y_full - want[0]))) > 1e-3
        if kind != "BatchCenter":
            assert np.max(np.abs(np.asarray(st_full["var"] - want[1]["var"]))) > 1e-3


def test_unbiased_uses_the_sub_batch_count():
    """The variance factor is V*S/(V*S-1) = 8/7, not the full batch's 32/31: with the
    full-batch factor the running variance would be off by (8/7)/(32/31) - 1 ~ 11%."""
    with jax.enable_x64(True):
        x, ct = data()
        _, st, _ = linen_train("BatchNorm", V)(x, ct, None)
        batch = (st["var"] - MOM * 1.0) / (1 - MOM)  # the batch term of the EMA
        p = params_of("BatchNorm")
        biased = jnp.mean(
            jnp.stack([op("BatchNorm", x[j * V : (j + 1) * V], p)[1].var for j in range(B // V)]),
            0,
        )
        close(batch, biased * (V * S) / (V * S - 1))


def test_masked_sub_batches_use_their_own_counts():
    """With a row mask the sub-batches hold 4, 3, 2 and 1 valid rows; each sub-batch's
    variance is unbiased with its own count m_j = rows_j * S."""
    rows = np.array([4, 3, 2, 1])
    rows_valid = (np.arange(V)[None, :] < rows[:, None]).reshape(B)
    mask = jnp.asarray(np.broadcast_to(rows_valid[:, None], (B, S)))  # x's shape less features
    with jax.enable_x64(True):
        x, ct = data()
        for kind in ("BatchNorm", "BatchInhib"):
            want = expected(kind, x, ct, mask=mask, m_of=lambda j: rows[j] * S)
            close(linen_train(kind, V, True)(x, ct, mask), want)


def test_empty_sub_batches_are_left_out_of_the_running_statistics():
    """Rows 4, 0, 2, 0 valid: the two empty sub-batches (padding, say) contribute no
    statistics, so the running mean and variance are those of sub-batches 0 and 2 alone.
    Counted as zeros, they would pull the running mean halfway to 0 (the test can fail:
    checked against the plain average over all four)."""
    rows = np.array([4, 0, 2, 0])
    rows_valid = (np.arange(V)[None, :] < rows[:, None]).reshape(B)
    mask = jnp.asarray(np.broadcast_to(rows_valid[:, None], (B, S)))
    with jax.enable_x64(True):
        x, ct = data()
        for kind in ("BatchNorm", "BatchInhib"):
            want = expected(kind, x, ct, mask=mask, m_of=lambda j: rows[j] * S)
            got = linen_train(kind, V, True)(x, ct, mask)
            close(got, want)
            means = [jnp.mean(x[j * V : j * V + rows[j]], (0, 1)) for j in (0, 2)]
            close(got[1]["mean"], (1 - MOM) * (means[0] + means[1]) / 2)


def test_eval_mode_ignores_virtual_batch_size():
    """In eval mode the running statistics are used; a batch of 6 (not a multiple of V)
    gives the output of the same module without virtual_batch_size."""
    with jax.enable_x64(True):
        x, _ = data()
        x6 = x[:6]
        for kind in KINDS:
            ghost = getattr(bl, kind)(**options(kind, virtual_batch_size=V))
            plain = getattr(bl, kind)(**options(kind))
            variables = plain.init(jax.random.key(0), x, use_running_average=True)
            close(
                ghost.apply(variables, x6, use_running_average=True),
                plain.apply(variables, x6, use_running_average=True),
            )
            m = getattr(bx, kind)(N, **options(kind, virtual_batch_size=V), rngs=nnx.Rngs(0))
            m.eval()
            close(m(x6), plain.apply(variables, x6, use_running_average=True))


def test_under_shard_map_the_count_includes_the_devices():
    """8 devices, 4 rows each, V=2 and axis_name: ghost batch j groups rows 2j, 2j+1 of
    every device (16 rows); m = 2 * S * 8. The module's y and statistics equal the op on
    those gathered rows."""
    nd, v = 8, 2
    if len(jax.devices()) < nd:
        pytest.skip("needs 8 devices (tests/conftest.py sets them up)")
    mesh = parallel.make_mesh(nd)
    with jax.enable_x64(True):
        x = jnp.concatenate([data()[0]] * 2)  # 32 rows
        mdl = bl.BatchNorm(**options("BatchNorm", virtual_batch_size=v, axis_name="data"))
        variables = bl.BatchNorm(**options("BatchNorm")).init(
            jax.random.key(0), x[:4], use_running_average=False
        )

        def step(x):
            y, upd = mdl.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P())))
        y, st = f(x)
        xd = x.reshape(nd, 4 // v, v, S, N)  # device, sub-batch, row, position, feature
        p = params_of("BatchNorm")
        ys, means, vars_ = [], [], []
        for j in range(4 // v):
            yj, sj = op("BatchNorm", xd[:, j].reshape(nd * v, S, N), p)
            ys.append(yj.reshape(nd, v, S, N))
            means.append(sj.mean)
            m = v * S * nd
            vars_.append(sj.var * m / (m - 1))
        close(y, jnp.stack(ys, 1).reshape(x.shape))
        close(st["mean"], (1 - MOM) * jnp.mean(jnp.stack(means), 0))
        close(st["var"], MOM + (1 - MOM) * jnp.mean(jnp.stack(vars_), 0))


def test_errors_name_the_module_and_the_argument():
    # float64 throughout (the options build float64 parameters): inside enable_x64, so
    # nothing is truncated to float32 with a warning
    with jax.enable_x64(True):
        x, _ = data()
        for kind in KINDS:
            mdl = getattr(bl, kind)(**options(kind, virtual_batch_size=5))
            v = mdl.init(jax.random.key(0), x, use_running_average=False)  # init: eval form
            with pytest.raises(ValueError, match=rf"{kind}: virtual_batch_size=5 must divide.*16"):
                mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            m = getattr(bx, kind)(N, **options(kind, virtual_batch_size=5), rngs=nnx.Rngs(0))
            with pytest.raises(ValueError, match=rf"{kind}: virtual_batch_size=5 must divide.*16"):
                m(x)
            with pytest.raises(ValueError, match=rf"{kind}: virtual_batch_size must be an int"):
                getattr(bx, kind)(N, virtual_batch_size=0, rngs=nnx.Rngs(0))
            with pytest.raises(TypeError, match=rf"{kind}: virtual_batch_size must be an int"):
                mdl = getattr(bl, kind)(virtual_batch_size=2.0)
                mdl.init(jax.random.key(0), x, use_running_average=False)


def test_a_mask_that_broadcasts_to_x_is_split_as_x():
    """A mask of fewer dimensions than x that broadcasts to it (flax's reading: here one
    flag per (position, feature), shared by every row) is given x's rank before the
    batch is split, so each sub-batch gets the same mask; it used to be taken for a row
    mask and refused with a broadcasting error. The output equals the op per
    sub-batch."""
    with jax.enable_x64(True):
        x, _ = data()
        fm = jnp.array([[True, False, True, True], [True, True, True, False]])  # (S, N)
        y, st = jb.batch_norm(x, mask=fm, virtual_batch_size=V)
        subs = [jb.batch_norm(x[i : i + V], mask=fm) for i in range(0, B, V)]
        close(y, jnp.concatenate([s[0] for s in subs]))
        close(st.mean, jnp.mean(jnp.stack([s[1].mean for s in subs]), 0))
        close(st.var, jnp.mean(jnp.stack([s[1].var for s in subs]), 0))


@pytest.mark.parametrize("name", ["BatchNorm", "BatchCenter", "BatchInhib", "IterNorm", "ZCANorm"])
def test_linen_init_accepts_a_dummy_batch_that_ghost_batches_do_not_divide(name):
    """init on the usual dummy batch of one (or any batch virtual_batch_size does not
    divide) raised 'must divide the batch size', though init updates no statistics: it
    uses the inference form there, and training on a divisible batch then works."""
    mdl = getattr(bl, name)(use_running_average=False, virtual_batch_size=4)
    v = mdl.init(jax.random.key(0), jnp.ones((1, 5, 3)))
    x = jax.random.normal(jax.random.key(1), (8, 5, 3))
    y, upd = mdl.apply(v, x, mutable=["batch_stats"])
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    assert not all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(
            jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(v["batch_stats"]), strict=True
        )
    )
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 must divide the batch size 6"):
        mdl.apply(v, x[:6], mutable=["batch_stats"])  # training still checks
