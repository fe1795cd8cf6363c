"""Masks select, they do not weight: garbage (NaN, inf) at masked positions reaches no
valid output, statistic, running statistic or gradient.

Each test fills every masked position with NaN (and, separately, inf) and compares with
the same op run on the valid rows alone, with no mask: outputs at the valid positions,
the batch statistics, the running statistics after a ``running.*_step`` and the
gradients of x (valid positions), scale, bias and alpha. The cotangent is finite and
nonzero at the masked positions too: masked outputs are constants to differentiation
(``docs/derivations.md``, "Masks select"), so it changes nothing, and dx is 0 there.
Covered: batch_norm, batch_center, batch_inhib (groups=2), with and without
``virtual_batch_size``, float32 and float64, one device and 8 devices (shard_map with
``axis_name``, uneven valid rows, one device with none).

Tolerances: the masked run and the valid-rows run add the same valid values in a
different order (sums over 16 or 32 terms). float64: rtol 1e-10, atol 1e-12 (measured
below 1e-14). float32: rtol 2e-5, atol 2e-6 plus 2e-5 of the array's largest value
(measured 5e-8 of it at most).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import parallel, running
from jax_batchinhib import reference as ref
from jax_batchinhib.ops.batch_inhib import InhibOptions

B, N = 16, 4
V = 4  # ghost batch size: 4 sub-batches of 4 rows
# valid rows: at least 2 in each sub-batch of 4
VALID = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0], bool)
TOL = {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6)}
# batch_inhib with groups=2 (groups=1 is the same code with one group)
OPS = ["batch_norm", "batch_center", "batch_inhib_groups2"]
FILLS = [np.nan, np.inf]


def close(a, b, dtype):
    """Pointwise, with atol scaled by the array's largest value (as check_vjp measures):
    batch_inhib on sub-batches of 2 or 3 rows is ill-conditioned and its gradients reach
    1e2 to 1e3, where float32 round-off is ~1e-5 absolute."""
    rtol, atol = TOL[dtype]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        v = np.asarray(v)
        scale = float(np.max(np.abs(v))) if v.size else 0.0
        np.testing.assert_allclose(np.asarray(u), v, rtol=rtol, atol=atol + rtol * scale)


def params(dtype):
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "scale": (1.0 + 0.3 * jax.random.normal(k[0], (N,))).astype(dtype),
        "bias": (0.5 * jax.random.normal(k[1], (N,))).astype(dtype),
        "alpha1": (0.5 * jax.random.normal(k[2], (N, N))).astype(dtype),
        "alpha2": (0.5 * jax.random.normal(k[2], (2, N // 2, N // 2))).astype(dtype),
    }


def data(dtype, b=B):
    kx, kc = jax.random.split(jax.random.key(0))
    mix = jnp.array(
        [[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, 0.4, 0.0], [0.3, 0.0, 1.0, 0.5], [0.0, 0.2, 0.0, 1.0]]
    )
    x = jax.random.normal(kx, (b, N)) @ mix + jnp.array([2.0, -1.0, 0.5, 3.0])
    return x.astype(dtype), jax.random.normal(kc, (b, N)).astype(dtype)


def call(name, x, p, **kw):
    if name == "batch_norm":
        return jb.batch_norm(x, p["scale"], p["bias"], **kw)
    if name == "batch_center":
        return jb.batch_center(x, p["bias"], **kw)
    g = 2 if name == "batch_inhib_groups2" else 1
    return jb.batch_inhib(x, p[f"alpha{g}"], groups=g, **kw)


def stats_loss(name, st):
    """The statistics of batch_norm/batch_center are differentiable outputs."""
    if name == "batch_norm":
        return jnp.sum(jnp.sin(st.mean)) + jnp.sum(jnp.cos(st.var))
    if name == "batch_center":
        return jnp.sum(jnp.sin(st.mean))
    return 0.0


def loss(name, x, p, ct, n_share=1, **kw):
    y, st = call(name, x, p, **kw)
    return jnp.sum(y * ct) + stats_loss(name, st) / n_share, (y, st)


@functools.partial(jax.jit, static_argnums=(0, 5))
def masked_run(name, x, p, ct, mask, v):
    g = jax.grad(loss, argnums=(1, 2), has_aux=True)
    (dx, dp), (y, st) = g(name, x, p, ct, mask=mask, virtual_batch_size=v)
    return y, st, dx, dp


@functools.partial(jax.jit, static_argnums=(0,))
def valid_run(name, xs, p, cts):
    """The op on the valid rows of each sub-batch alone (a list: one entry without ghost
    batches), no mask; statistics averaged over the sub-batches as ghost batches do."""

    def f(xs, p):
        outs = [call(name, x, p) for x in xs]
        st = jax.tree.map(lambda *s: sum(s) / len(s), *[o[1] for o in outs])
        lo = sum(jnp.sum(o[0] * c) for o, c in zip(outs, cts, strict=True))
        return lo + stats_loss(name, st), ([o[0] for o in outs], st)

    (dxs, dp), (ys, st) = jax.grad(f, argnums=(0, 1), has_aux=True)(xs, p)
    return ys, st, dxs, dp


def check_against_valid(name, dtype, fill, v):
    x, ct = data(dtype)
    p = params(dtype)
    xbad = jnp.where(VALID[:, None], x, fill)
    y, st, dx, dp = masked_run(name, xbad, p, ct, jnp.asarray(VALID), v)
    subs = [slice(0, B)] if v is None else [slice(j, j + v) for j in range(0, B, v)]
    xs = [x[sl][VALID[sl]] for sl in subs]
    cts = [ct[sl][VALID[sl]] for sl in subs]
    ys, st_w, dxs, dp_w = valid_run(name, xs, p, cts)
    close(y[VALID], jnp.concatenate(ys), dtype)
    close(st, st_w, dtype)
    close(dx[VALID], jnp.concatenate(dxs), dtype)
    assert np.all(np.asarray(dx)[~VALID] == 0)  # masked outputs pass no gradient
    used = {"batch_norm": ["scale", "bias"], "batch_center": ["bias"]}.get(
        name, ["alpha2" if name.endswith("2") else "alpha1"]
    )
    close([dp[k] for k in used], [dp_w[k] for k in used], dtype)


@pytest.mark.parametrize("v", [None, V], ids=["batch", "ghost"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", OPS)
def test_garbage_at_masked_positions_changes_nothing(name, dtype, v):
    """NaN, then inf, at every masked position: valid outputs, statistics and gradients
    equal the op on the valid rows alone."""
    with jax.enable_x64(dtype == "float64"):
        for fill in FILLS:
            check_against_valid(name, dtype, fill, v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_feature_mask_with_garbage(dtype):
    """An x-shaped mask (each feature its own valid values) for batch_norm and
    batch_center: NaN/inf where masked gives what a finite filler gives, and the
    statistics are those of each feature's valid values."""
    with jax.enable_x64(dtype == "float64"):
        x, ct = data(dtype)
        p = params(dtype)
        m = np.array(jax.random.bernoulli(jax.random.key(7), 0.6, (B, N)))
        m[:2] = True
        for name in ("batch_norm", "batch_center"):
            want = masked_run(name, jnp.where(m, x, 0.0), p, ct, jnp.asarray(m), None)
            for fill in FILLS:
                y, st, dx, dp = masked_run(name, jnp.where(m, x, fill), p, ct, jnp.asarray(m), None)
                close((y[m], st, dx, dp), (want[0][m], *want[1:]), dtype)
            xn = np.where(m, np.asarray(x, np.float64), np.nan)
            close(st.mean, np.nanmean(xn, 0), dtype)
            if name == "batch_norm":
                close(st.var, np.nanvar(xn, 0), dtype)


# ------------------------------------------------------------ running statistics


def step(name, x, p, mask, v, momentum):
    st = running.Step(
        use_running_average=False, update_stats=True, momentum=momentum, unbiased=True,
        axis=-1, virtual_batch_size=v,
    )  # fmt: skip
    zeros = jnp.zeros((N,), x.dtype)
    if name == "batch_norm":
        count = None if momentum is not None else jnp.zeros((N,), jnp.int32)
        state = running.RunningStats(zeros, jnp.ones((N,), x.dtype), count=count)
        return running.batch_norm_step(
            name, x, p["scale"], p["bias"], state, st, epsilon=1e-5, mask=mask
        )[1]
    if name == "batch_center":
        count = None if momentum is not None else jnp.zeros((N,), jnp.int32)
        state = running.RunningStats(zeros, count=count)
        return running.batch_center_step(name, x, p["bias"], state, st, mask=mask)[1]
    g = 2 if name == "batch_inhib_groups2" else 1
    a = p[f"alpha{g}"]
    count = None if momentum is not None else jnp.zeros((), jnp.int32)
    state = running.RunningStats(zeros, zeros, jnp.zeros(a.shape, x.dtype), count)
    options = InhibOptions.checked(name, groups=g)
    return running.batch_inhib_step(name, x, a, state, st, options=options, mask=mask)[1]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", OPS)
def test_running_statistics_ignore_garbage(name, dtype):
    """One training step's running statistics (EMA and cumulative, unbiased, with and
    without ghost batches) with NaN/inf at the masked rows equal those of the valid rows
    alone (without ghost batches) or of a finite filler (with them: each ghost batch's
    own count)."""
    with jax.enable_x64(dtype == "float64"):
        x, _ = data(dtype)
        p = params(dtype)
        mask = jnp.asarray(VALID)
        f = jax.jit(step, static_argnums=(0, 4, 5))
        for momentum in (0.9, None):
            want = f(name, x[VALID], p, None, None, momentum)
            want_g = f(name, jnp.where(VALID[:, None], x, 0.0), p, mask, V, momentum)
            for fill in FILLS:
                xbad = jnp.where(VALID[:, None], x, fill)
                close(f(name, xbad, p, mask, None, momentum), want, dtype)
                got_g = f(name, xbad, p, mask, V, momentum)
                close(got_g, want_g, dtype)
                assert all(np.all(np.isfinite(s)) for s in jax.tree.leaves(got_g))


# ------------------------------------------------------------------ 8 devices

ND = 8
# valid rows per device (4 rows each): uneven, one device with none
COUNTS = np.array([4, 3, 1, 0, 2, 4, 1, 3])


@pytest.mark.skipif(len(jax.devices()) < ND, reason="needs 8 devices (tests/conftest.py)")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", OPS)
def test_garbage_on_eight_devices(name, dtype):
    """shard_map over 8 devices with axis_name, uneven valid rows (one device with none),
    NaN/inf at the masked rows: valid outputs, statistics and gradients equal the op on
    the valid rows gathered on one device."""
    b = 32
    valid = (np.arange(b // ND)[None, :] < COUNTS[:, None]).reshape(b)
    with jax.enable_x64(dtype == "float64"):
        x, ct = data(dtype, b)
        p = params(dtype)
        ys, st_w, dxs, dp_w = valid_run(name, [x[valid]], p, [ct[valid]])

        def body(x, p, ct, mask):
            g = jax.grad(loss, argnums=(1, 2), has_aux=True)
            (dx, dp), (y, st) = g(name, x, p, ct, n_share=ND, axis_name="data", mask=mask)
            return y, st, dx, dp

        f = jax.jit(
            jax.shard_map(
                body,
                mesh=parallel.make_mesh(ND),
                in_specs=(P("data"), P(), P("data"), P("data")),
                out_specs=(P("data"), P(), P("data"), P()),
            )
        )
        for fill in FILLS:
            y, st, dx, dp = f(jnp.where(valid[:, None], x, fill), p, ct, jnp.asarray(valid))
            close(y[valid], ys[0], dtype)
            close(st, st_w, dtype)
            close(dx[valid], dxs[0], dtype)
            assert np.all(np.asarray(dx)[~valid] == 0)
            close(jax.tree.leaves(dp), jax.tree.leaves(dp_w), dtype)


@pytest.mark.parametrize(
    "name", ["batch_norm", "batch_norm_two_pass", "batch_inhib", "iter_norm", "zca_norm"]
)
def test_second_order_with_garbage_in_the_padding_equals_reference(name):
    """grad of grad (the rule's backward differentiated by autodiff, through its forward)
    with NaN and inf at masked positions: finite, and equal to the reference's (float64,
    rtol 1e-10 of the largest entry). The forward built the masked outputs from the raw x
    as plain JAX, so differentiating it gave 0 * NaN: every valid entry of the second
    derivative was NaN (batch_center's masked outputs do not multiply x by a parameter)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((8, N)))
        w = jnp.asarray(rng.standard_normal((8, N)))
        s, b = jnp.asarray(rng.standard_normal(N) + 2), jnp.asarray(rng.standard_normal(N))
        rows = jnp.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
        x = x.at[2].set(jnp.nan).at[5, 1].set(jnp.inf)
        inhib = dict(denominator="abs", guard_mode="relative")  # O(1) gradients at alpha 0
        calls = {
            "batch_norm": (lambda m, x, p: m.batch_norm(x, p, b, mask=rows), s),
            "batch_norm_two_pass": (
                lambda m, x, p: m.batch_norm(x, p, b, mask=rows, use_fast_variance=False),
                s,
            ),
            "batch_inhib": (
                lambda m, x, p: m.batch_inhib(x, p, mask=rows, **inhib),
                jnp.zeros((N, N)),
            ),
            "iter_norm": (lambda m, x, p: m.iter_norm(x, p, b, mask=rows), s),
            "zca_norm": (lambda m, x, p: m.zca_norm(x, p, b, mask=rows), s),
        }
        call, p = calls[name]

        def second(mod):
            def loss(x, p):
                y = call(mod, x, p)[0]
                return jnp.sum(jnp.sin(jnp.where(rows[:, None], y, 0.0)) * w)

            def g(x, p):
                gx, gp = jax.grad(loss, (0, 1))(x, p)
                return jnp.sum(jnp.where(rows[:, None], gx, 0.0) ** 2) + jnp.sum(gp**2)

            return jax.jit(jax.grad(g, (0, 1)))(x, p)

        got, want = second(jb), second(ref)
        for a, r in zip(got, want, strict=True):
            a, r = np.asarray(a), np.asarray(r)
            a_valid = a[np.asarray(rows)] if a.shape == x.shape else a
            r_valid = r[np.asarray(rows)] if r.shape == x.shape else r
            assert np.all(np.isfinite(a_valid)), (name, a)
            np.testing.assert_allclose(a_valid, r_valid, rtol=0, atol=1e-10 * np.abs(r_valid).max())


@pytest.mark.parametrize("case", ["empty_sub_batch", "empty_feature", "all_masked"])
def test_epsilon_zero_with_an_empty_feature_gives_finite_gradients(case):
    """epsilon=0 (allowed, as flax) and a feature or ghost sub-batch with no valid value:
    its variance is 0 and its inv infinite, and the backward's inf * 0 put NaN into dx
    at its (masked) positions, so into every upstream weight, and into dscale. Its terms
    are all 0 now: the upstream gradient equals autodiff of the reference (float64
    round-off, rtol 1e-10), and dscale is finite (the reference's is NaN there, so it is
    compared on the live features only)."""
    mask, vbs = {
        "empty_sub_batch": (jnp.array([1, 1, 0, 0, 1, 1], bool), 2),
        "empty_feature": (jnp.ones((6, 3), bool).at[:, 1].set(False), None),
        "all_masked": (jnp.zeros((6,), bool), None),
    }[case]
    keep = mask if mask.ndim == 2 else mask[:, None]

    def grads(op):
        x = jax.random.normal(jax.random.key(0), (6, 3), jnp.float64)
        w = jax.random.normal(jax.random.key(1), (3, 3), jnp.float64)
        scale = jnp.array([1.0, 2.0, 0.5], jnp.float64)

        def loss(w, scale):
            y, st = op(x @ w, scale, None, mask=mask, virtual_batch_size=vbs, epsilon=0.0)
            stats = jnp.sum(jnp.cos(st.mean)) + jnp.sum(jnp.sin(st.var))  # dmean and dvar
            return jnp.sum(jnp.where(keep, jnp.sin(y), 0.0)) + stats

        return jax.grad(loss, argnums=(0, 1))(w, scale)

    with jax.enable_x64(True):
        (dw, dscale), (dw_ref, dscale_ref) = grads(jb.batch_norm), grads(ref.batch_norm)
    assert bool(jnp.isfinite(dw).all()) and bool(jnp.isfinite(dscale).all())
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-10, atol=1e-12)
    live = jnp.isfinite(dscale_ref)
    np.testing.assert_allclose(dscale[live], dscale_ref[live], rtol=1e-10, atol=1e-12)
    if case == "empty_feature":
        assert float(dscale[1]) == 0.0 and bool(live[0]) and not bool(live[1])
