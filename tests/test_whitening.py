"""iter_norm and zca_norm (batch whitening): the hand-derived VJPs against autodiff of the
references, the guard for equal eigenvalues, whitening quality, transforms, errors and
what the backward keeps.

Tolerances (relative, normwise, as ``jax_batchinhib.testing.TOLERANCES``): 1e-10 in
float64 and 1e-4 in float32. ZCA is compared on inputs whose covariance eigenvalues are
separated (``_data`` gives them spread scales); autodiff of ``eigh`` carries
1/(λ_i − λ_k) terms, so the reference itself loses accuracy as eigenvalues approach
each other, while the op's rule does not (``test_zca_equal_eigenvalues_*``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_batchinhib as jb
from jax_batchinhib import parallel
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp

HYP = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

OPS = {"iter_norm": (jb.iter_norm, ref.iter_norm), "zca_norm": (jb.zca_norm, ref.zca_norm)}
INF_OPS = {
    "iter_norm_inference": (jb.iter_norm_inference, ref.iter_norm_inference),
    "zca_norm_inference": (jb.zca_norm_inference, ref.zca_norm_inference),
}


def _data(shape, dtype, seed=0, axis=-1):
    """Correlated, off-centre features whose covariance eigenvalues are spread (scales
    0.5..2 along random directions), so that ZCA's reference is well conditioned."""
    rng = np.random.default_rng(seed)
    n = shape[axis]
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mix = q * np.linspace(0.5, 2.0, n)  # column scales: distinct principal variances
    z = rng.standard_normal((*shape[: axis % len(shape)], *shape[axis % len(shape) + 1 :], n))
    x = np.moveaxis(z @ mix.T + rng.standard_normal(n) * 0.5 + 0.3, -1, axis % len(shape))
    return jnp.asarray(x, dtype)


def _vec(n, dtype, seed, shift=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(shift + 0.3 * rng.standard_normal(n), dtype)


# ------------------------------------------------------------------ VJP vs autodiff


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("name", list(OPS))
def test_vjp_matches_reference(name, groups, dtype):
    """dx, dscale, dbias and the forward (y and statistics) against autodiff of the
    reference. Measured worst relative error (float64 / float32): iter_norm 7e-16 /
    5e-7, zca_norm 3e-15 / 1.4e-6."""
    op, rf = OPS[name]
    with jax.enable_x64(dtype == "float64"):
        x = _data((48, 6), dtype, 1)
        check_vjp(op, rf, x, _vec(6, dtype, 2), _vec(6, dtype, 3, 0.0), groups=groups)


@pytest.mark.parametrize("name", list(OPS))
def test_vjp_matches_reference_nhwc_mask_axis(name):
    """Rank 4, features on axis 1, a row mask, no scale/bias, other epsilon/iterations."""
    op, rf = OPS[name]
    kw = {"iterations": 7} if name == "iter_norm" else {}
    with jax.enable_x64(True):
        x = _data((6, 4, 3, 5), jnp.float64, 4, axis=1)
        mask = jnp.asarray(np.random.default_rng(5).random((6, 3, 5)) < 0.7)
        check_vjp(op, rf, x, axis=1, mask=mask, epsilon=1e-3, **kw)
        check_vjp(op, rf, x, None, _vec(4, jnp.float64, 6), axis=1, groups=2, mask=mask)
        # masked statistics are those of the valid rows alone
        _, s = jax.jit(functools.partial(op, axis=1))(x, mask=mask)
        sel = np.moveaxis(np.asarray(x), 1, -1)[np.asarray(mask)]
        np.testing.assert_allclose(s.mean, sel.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.cov[0], np.cov(sel.T, bias=True), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(INF_OPS))
def test_inference_vjp_matches_reference(name, dtype):
    op, rf = INF_OPS[name]
    with jax.enable_x64(dtype == "float64"):
        x = _data((20, 6), dtype, 7)
        _, s = jax.jit(functools.partial(jb.zca_norm, groups=2))(_data((64, 6), dtype, 8))
        args = (x, _vec(6, dtype, 9), _vec(6, dtype, 10, 0.0), s.mean, s.whitening_matrix)
        check_vjp(op, rf, *args, groups=2)
        _, s1 = jax.jit(jb.iter_norm)(_data((64, 6), dtype, 8))
        check_vjp(op, rf, x, None, None, s1.mean, s1.whitening_matrix[0])  # (N, N) form


@pytest.mark.parametrize("name", list(OPS))
def test_inference_applies_the_batch_whitening(name):
    """With the batch's own mean and W, the inference form reproduces the training y."""
    op, _ = OPS[name]
    inf = INF_OPS[name + "_inference"][0]
    with jax.enable_x64(True):
        x, sc, b = _data((30, 6), jnp.float64, 11), _vec(6, jnp.float64, 1), _vec(6, jnp.float64, 2)
        y, s = op(x, sc, b, groups=2)
        yi = inf(x, sc, b, s.mean, s.whitening_matrix, groups=2)
        np.testing.assert_allclose(yi, y, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------- ZCA's equal-eigenvalue guard


def _equal_variance_pair():
    """Two independent (orthogonal, zero-mean) features of identical variance: columns
    1 and 2 of the 8x8 Hadamard matrix (entries ±1). Their covariance is exactly I, so
    Σ + εI has one double eigenvalue 1 + ε."""
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h[:, 1:3] * 1.5 + np.array([0.3, -0.2]), jnp.float64)


def test_zca_equal_eigenvalues_guard():
    """With a double eigenvalue, autodiff of the eigh reference is not finite (its
    1/(λ_i − λ_k) = 1/0), while the rule (divided differences of λ^{-1/2} written as
    -1/(r_i r_k (r_i + r_k)), whose limit at λ_i = λ_k is -½λ^{-3/2}) gives the exact
    gradient: it equals central finite differences of the forward, and autodiff of the
    IterNorm reference run to convergence (at Σ = cI, d(Σ^{-1/2}) = -½ c^{-3/2} dΣ, which
    Newton-Schulz's derivative reaches with no eigendecomposition)."""
    with jax.enable_x64(True):
        x = _equal_variance_pair()
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape))

        def loss(op):
            return lambda x: jnp.sum(op(x, epsilon=1e-5)[0] * ct)

        g_ref = jax.jit(jax.grad(loss(ref.zca_norm)))(x)
        assert not np.all(np.isfinite(g_ref)), "autodiff of eigh is expected to blow up here"
        g = jax.jit(jax.grad(loss(jb.zca_norm)))(x)
        assert np.all(np.isfinite(g))
        # the same map X -> X_c (X_cᵀX_c/m + εI)^{-1/2} by IterNorm's reference with enough
        # Newton steps to converge to round-off (Σ_N = I/2 here: quadratic, 1e-16 by step 7)
        g_newton = jax.jit(jax.grad(loss(functools.partial(ref.iter_norm, iterations=12))))(x)
        np.testing.assert_allclose(g, g_newton, rtol=1e-12, atol=1e-13)  # measured 1.4e-16
        # and central finite differences (float64, step 1e-5: truncation ~1e-10)
        check_grads(jax.jit(loss(jb.zca_norm)), (x,), order=1, modes=["rev"], eps=1e-5, rtol=1e-7)


def test_zca_near_equal_eigenvalues():
    """Eigenvalues a relative 1e-7 apart: autodiff of the reference is finite but loses
    accuracy as 1/gap (measured 1.6e-10 relative), while the rule stays at round-off
    (measured 1.4e-16), both against the converged Newton-Schulz reference."""
    with jax.enable_x64(True):
        x = _equal_variance_pair() * jnp.array([1.0, 1.0 + 5e-8])
        ct = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))

        def loss(op):
            return lambda x: jnp.sum(op(x)[0] * ct)

        g = jax.jit(jax.grad(loss(jb.zca_norm)))(x)
        g_ref = jax.jit(jax.grad(loss(ref.zca_norm)))(x)
        g_newton = jax.jit(jax.grad(loss(functools.partial(ref.iter_norm, iterations=12))))(x)
        err_rule = np.max(np.abs(g - g_newton)) / np.max(np.abs(g_newton))
        err_ref = np.max(np.abs(g_ref - g_newton)) / np.max(np.abs(g_newton))
        assert err_rule < 1e-14, err_rule  # measured 1.4e-16
        assert err_ref > 100 * err_rule, (err_ref, err_rule)  # autodiff: measured 1.6e-10


# ------------------------------------------------------------------------ second order


def _second_order_cases():
    x = _data((8, 3), jnp.float64, 12)
    sc, b = _vec(3, jnp.float64, 1), _vec(3, jnp.float64, 2, 0.0)
    _, s = ref.zca_norm(x)
    return {
        "iter_norm": (lambda x, s, b: jb.iter_norm(x, s, b, iterations=2)[0], (x, sc, b)),
        "zca_norm": (lambda x, s, b: jb.zca_norm(x, s, b)[0], (x, sc, b)),
        "iter_norm_inference": (
            lambda x, s, m, w: jb.iter_norm_inference(x, s, None, m, w),
            (x, sc, s.mean, s.whitening_matrix),
        ),
    }


@pytest.mark.parametrize("name", ["iter_norm", "zca_norm", "iter_norm_inference"])
def test_second_order_finite_differences(name):
    """grad of grad through the custom rules, by finite differences in float64: what
    ``check_grads(f, order=2, modes=["rev"])`` checks (reverse mode of f, then of f's
    VJP as a function of the inputs and the cotangent), with f and its VJP each jitted
    once so the finite differences reuse one compiled function (check_grads' order=2
    retraces the VJP at every perturbed point). IterNorm with T=2, so the reverse pass
    carries P̄ from one Newton step to the one before."""
    with jax.enable_x64(True):
        f, args = _second_order_cases()[name]
        y = f(*args)
        ct = jnp.asarray(np.random.default_rng(3).standard_normal(y.shape))

        def f_vjp(*a):
            return jax.vjp(f, *a[:-1])[1](a[-1])

        # central differences with eps=1e-4: truncation ~eps^2 = 1e-8
        tol = dict(order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-4)
        check_grads(jax.jit(f), args, **tol)
        check_grads(jax.jit(f_vjp), (*args, ct), **tol)


# ------------------------------------------------------------------------- whitening


def test_zca_output_covariance_is_identity():
    """float64: x̂ᵀx̂/m = I - εW² (W Σ W = I exactly); with ε = 1e-14, cov(x̂) = I."""
    with jax.enable_x64(True):
        x = _data((200, 8), jnp.float64, 13)
        for eps in (1e-5, 1e-14):
            y, s = jb.zca_norm(x, epsilon=eps)
            c = jnp.cov(y.T, bias=True)
            w = s.whitening_matrix[0]
            np.testing.assert_allclose(c + eps * w @ w, np.eye(8), atol=1e-8)
        np.testing.assert_allclose(c, np.eye(8), atol=1e-8)


def test_iter_norm_approaches_identity():
    """‖W Σ Wᵀ − I‖_F for T = 1..10 on (256, 8) float64 data with spread variances.
    (condition number 17). Measured: 2.2, 1.7, 1.3, 0.86, 0.46, 0.16, 0.019, 2.6e-4,
    5e-8, 1.4e-11 (slow while the smallest eigenvalue of P²Σ_N is far below 1, each step
    multiplying it by about 9/4, then quadratic). Each value equals the scalar recursion
    p ← (3p − p³μ)/2 run on the eigenvalues μ of Σ_N."""
    with jax.enable_x64(True):
        x = _data((256, 8), jnp.float64, 14)
        stats = jax.jit(lambda x, t: jb.iter_norm(x, iterations=t)[1], static_argnums=1)
        errs = []
        for t in range(1, 11):
            s = stats(x, t)
            sig = s.cov[0] + 1e-5 * jnp.eye(8)
            w = s.whitening_matrix[0]
            errs.append(float(jnp.linalg.norm(w @ sig @ w.T - jnp.eye(8))))
            mu = np.linalg.eigvalsh(np.asarray(sig)) / np.trace(np.asarray(sig))
            p = np.ones_like(mu)
            for _ in range(t):
                p = 1.5 * p - 0.5 * p**3 * mu
            np.testing.assert_allclose(
                errs[-1], np.linalg.norm(p * p * mu - 1), rtol=1e-6, atol=1e-10
            )
        assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs  # decreasing
        assert errs[0] > 1.0 and errs[-1] < 1e-9, errs
        # the ZCA limit: IterNorm's W tends to ZCA's W
        sz = jax.jit(lambda x: jb.zca_norm(x)[1])(x)
        np.testing.assert_allclose(s.whitening_matrix, sz.whitening_matrix, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------- transforms


def _loss(name, groups=2):
    op = OPS[name][0]

    def f(x):
        y, _ = op(x, jnp.full((4,), 1.5), jnp.full((4,), 0.1), groups=groups)
        return jnp.sum(jnp.sin(y))

    return f


@pytest.mark.parametrize("name", list(OPS))
def test_jit_vmap_agree(name):
    """vmap over an ensemble axis of 3 gives each member's jitted value and gradient, and
    jit gives the eager (op-by-op) result."""
    f = _loss(name)
    xs = jnp.stack([_data((16, 4), jnp.float32, s) for s in range(3)])
    vg = jax.value_and_grad(f)
    each = [jax.jit(vg)(x) for x in xs]
    vm = jax.jit(jax.vmap(vg))(xs)
    with jax.disable_jit():
        eager = vg(xs[0])
    # float32, same math in a different fusion order: measured max abs difference of the
    # gradients 1.0e-5 (iter_norm: T=5 matrix products) and 7e-7 (zca_norm)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(each[0][0], eager[0], **tol)
    np.testing.assert_allclose(each[0][1], eager[1], **tol)
    for i in range(3):
        np.testing.assert_allclose(vm[0][i], each[i][0], **tol)
        np.testing.assert_allclose(vm[1][i], each[i][1], **tol)


ND, B, N = 8, 32, 4  # 4 rows per device


@pytest.mark.skipif(len(jax.devices()) < ND, reason="needs 8 devices (tests/conftest.py)")
@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("name", list(OPS))
def test_shard_map_equals_full_batch(name, check_vma):
    """shard_map over 8 CPU devices with axis_name: y, statistics, dx, dscale and dbias
    equal the single-device full batch to float64 round-off (rtol 1e-10; measured 1e-15 relative),
    groups=2, with a mask that leaves one device without a valid row."""
    op = OPS[name][0]
    with jax.enable_x64(True):
        x = _data((B, N), jnp.float64, 15)
        ct = jnp.asarray(np.random.default_rng(16).standard_normal((B, N)))
        p = {"scale": _vec(N, jnp.float64, 17), "bias": _vec(N, jnp.float64, 18, 0.0)}
        mask = jnp.ones((B,), bool).at[:4].set(False).at[9].set(False)

        def loss(x, p, ct, mask, **kw):
            y, s = op(x, p["scale"], p["bias"], groups=2, mask=mask, **kw)
            return jnp.sum(y * ct), (y, s)

        def grads(x, p, ct, mask, **kw):
            (dx, dp), (y, s) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, p, ct, mask, **kw)
            return y, s, dx, dp

        want = jax.jit(grads)(x, p, ct, mask)

        def body(x, p, ct, mask):
            y, s, dx, dp = grads(x, p, ct, mask, axis_name="data")
            if not check_vma:
                dp = jax.lax.psum(dp, "data")
            return y, s, dx, dp

        f = jax.shard_map(
            body,
            mesh=parallel.make_mesh(ND),
            in_specs=(P("data"), P(), P("data"), P("data")),
            out_specs=(P("data"), P(), P("data"), P()),
            check_vma=check_vma,
        )
        got = jax.jit(f)(x, p, ct, mask)
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", list(OPS))
def test_garbage_at_masked_rows_changes_nothing(name, groups):
    """NaN or inf in masked (padding) rows: the valid rows' outputs, the statistics and
    every gradient equal those with zeros there (the covariance was a product with the
    mask, NaN * 0 = NaN, which made every output NaN); the masked rows' cotangent
    reaches no gradient and dx is 0 there, as for batch_norm (docs/derivations.md,
    "Masks select"). float32: the same program on the same valid values, so equal to
    the last bit."""
    op = OPS[name][0]
    x = _data((16, 4), jnp.float32, 21)
    mask = jnp.arange(16) < 12
    sc, b = jnp.full((4,), 1.3), jnp.full((4,), 0.2)
    ct = jax.random.normal(jax.random.key(4), (16, 4))

    @jax.jit
    def run(x):
        def loss(x, sc, b):
            y, st = op(x, sc, b, mask=mask, groups=groups)
            return jnp.sum(y * ct), (y, st)

        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, sc, b)

    want = run(x.at[12:].set(0.0))
    for fill in (jnp.nan, jnp.inf):
        (dx, dsc, db), (y, st) = run(x.at[12:].set(fill))
        np.testing.assert_array_equal(y[:12], want[1][0][:12])
        for a, w in zip(
            jax.tree.leaves((st, dsc, db)),
            jax.tree.leaves((want[1][1], *want[0][1:])),
            strict=True,
        ):
            np.testing.assert_array_equal(a, w)
        np.testing.assert_array_equal(dx[:12], want[0][0][:12])
        assert np.all(np.asarray(dx[12:]) == 0)


# ------------------------------------------------------------------------------ errors


def _raises(exc, match, f, *a, **k):
    with pytest.raises(exc, match=match):
        f(*a, **k)


@pytest.mark.parametrize("name", list(OPS))
def test_errors(name):
    op = OPS[name][0]
    x = jnp.ones((8, 6))
    _raises(ValueError, rf"{name}: groups=4 must divide the number of features N=6", op, x,
            groups=4)  # fmt: skip
    _raises(ValueError, rf"{name}: groups must be an int >= 1; got 0", op, x, groups=0)
    _raises(TypeError, rf"{name}: x must be a floating-point array.*int32", op,
            jnp.ones((8, 6), jnp.int32))  # fmt: skip
    _raises(ValueError, rf"{name}: training-mode statistics need more than one value", op,
            jnp.ones((1, 6)))  # fmt: skip
    _raises(ValueError, rf"{name}: epsilon must be > 0", op, x, epsilon=0.0)
    _raises(ValueError, rf"{name}: scale must have shape \(6,\) for x with 6 features; got \(5,\)",
            op, x, jnp.ones(5))  # fmt: skip
    # the wrong type is a TypeError, a wrong int a ValueError (ops/_checks.py's rule)
    _raises(TypeError, rf"{name}: groups must be an int >= 1; got 2.0", op, x, groups=2.0)
    _raises(TypeError, rf"{name}: groups must be an int >= 1; got True", op, x, groups=True)
    if name == "iter_norm":
        for bad, exc in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
            _raises(exc, rf"iter_norm: iterations must be a Python int >= 1.*{bad!r}",
                    op, x, iterations=bad)  # fmt: skip
    inf = INF_OPS[name + "_inference"][0]
    _raises(
        ValueError,
        rf"{name}_inference: whitening_matrix must have shape \(2, 3, 3\) for x with 6 "
        r"features and groups=2; got \(6, 6\)",
        inf, x, None, None, jnp.zeros(6), jnp.eye(6), groups=2,
    )  # fmt: skip
    # one feature axis only (a tuple reached x.shape[axis] with a tuple before)
    x3 = jnp.ones((8, 3, 2))
    one = r"axis must be an int \(one feature axis: the features are whitened together"
    _raises(TypeError, rf"{name}: {one}.*got \(1, 2\)", op, x3, axis=(1, 2))
    _raises(TypeError, rf"{name}_inference: {one}", inf, x3, None, None, jnp.zeros(6),
            jnp.eye(6), axis=(1, 2))  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPS))
def test_singular_covariance_is_finite(name, dtype):
    """Fewer rows than features, and a constant feature: ε keeps Σ + εI invertible, so
    outputs and gradients are finite (no error)."""
    op = OPS[name][0]
    with jax.enable_x64(dtype == "float64"):
        few = _data((3, 8), dtype, 19)
        const = _data((16, 4), dtype, 20).at[:, 2].set(7.0)

        @functools.partial(jax.jit, static_argnums=1)
        def run(x, g):
            y, s = op(x, groups=g)
            gx = jax.grad(lambda x: jnp.sum(jnp.sin(op(x, groups=g)[0])))(x)
            return y, s.whitening_matrix, gx

        for x, g in ((few, 1), (few, 2), (const, 1)):
            for a in run(x, g):
                assert np.all(np.isfinite(a)), (x.shape, g)


# -------------------------------------------------------------------------- hypothesis


@st.composite
def _shapes(draw):
    ndim = draw(st.integers(2, 3))
    feat = draw(st.sampled_from([2, 3, 4, 6]))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if feat % g == 0]))
    dims = [draw(st.integers(2, 6)) for _ in range(ndim - 1)]
    dims[0] = max(dims[0], 2 * feat // groups + 2)  # enough rows for a full-rank covariance
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = dims.copy()
    shape.insert(axis % ndim, feat)
    return tuple(shape), axis, groups


@HYP
@given(_shapes(), st.sampled_from(["float32", "float64"]), st.integers(0, 2**16),
       st.sampled_from(list(OPS)))  # fmt: skip
def test_vjp_matches_reference_hypothesis(shape_axis_groups, dtype, seed, name):
    """hypothesis draws the shape, feature axis, groups, dtype and op. For ZCA, draws whose
    covariance has eigenvalues closer than 5% of the largest are skipped: there autodiff of
    the eigh reference (not the rule) loses accuracy as 1/gap."""
    shape, axis, groups = shape_axis_groups
    op, rf = OPS[name]
    with jax.enable_x64(dtype == "float64"):
        x = _data(shape, dtype, seed, axis=axis)
        if name == "zca_norm":
            _, s = rf(x, axis=axis, groups=groups)
            lam = np.linalg.eigvalsh(np.asarray(s.cov, np.float64))
            gaps = np.diff(lam, axis=-1) / lam[:, -1:]
            assume(gaps.size == 0 or gaps.min() > 0.05)
        check_vjp(op, rf, x, _vec(shape[axis], dtype, seed + 1), axis=axis, groups=groups)


# --------------------------------------------------------------- what the backward keeps


def _residual_bytes(f, *args):
    """Bytes of the arrays the function returned by ``jax.vjp`` holds (traced, not run)."""
    leaves = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves if hasattr(leaf, "dtype"))


@pytest.mark.parametrize("groups", [1, 4])
def test_residuals(groups):
    """ZCA keeps x plus Σ, U and λ (2·G·n² + G·n; Σ carries the second derivatives);
    IterNorm keeps x plus P_1..P_T, each step's P² and P³, and Σ_N ((3T+1)·G·n²) and
    the trace. Both counts are exact (x and those matrices, plus a few per-feature
    vectors and scalars), and both are fewer bytes than autodiff of the reference keeps.
    Measured at (256, 32) float32 (x is 32.8 KB), T=5, jax 0.10.2: groups=1: zca_norm
    41.3 KB vs autodiff 71.2 KB, iter_norm 98.6 KB vs 152.6 KB (0.65x); groups=4:
    zca_norm 35.2 KB vs 42.6 KB, iter_norm 49.4 KB vs 51.6 KB (0.96x). With one group
    iter_norm keeps under 0.7x autodiff's (docs/derivations.md quotes this)."""
    m, nf, t = 256, 32, 5
    n = nf // groups
    x = _data((m, nf), jnp.float32, 21)
    small = 16 * nf * 4  # per-feature vectors and scalars
    ours_z = _residual_bytes(lambda x: jb.zca_norm(x, groups=groups)[0], x)
    auto_z = _residual_bytes(lambda x: ref.zca_norm(x, groups=groups)[0], x)
    ours_i = _residual_bytes(lambda x: jb.iter_norm(x, groups=groups, iterations=t)[0], x)
    auto_i = _residual_bytes(lambda x: ref.iter_norm(x, groups=groups, iterations=t)[0], x)
    big_z = x.nbytes + groups * (2 * n * n + n) * 4
    big_i = x.nbytes + (3 * t + 1) * groups * n * n * 4
    assert big_z <= ours_z <= big_z + small, (ours_z, big_z)
    assert big_i <= ours_i <= big_i + small, (ours_i, big_i)
    assert ours_z < auto_z and ours_i < auto_i, (ours_z, auto_z, ours_i, auto_i)
    if groups == 1:
        assert ours_i < 0.7 * auto_i, (ours_i, auto_i)


@pytest.mark.parametrize("name", list(OPS))
def test_epsilon_message_says_greater_than_zero(name):
    """0 is refused, so a negative, NaN or infinite epsilon gets the same "> 0" message
    (a negative one said ">= 0" before, from the generic check); the type stays a
    TypeError."""
    op = OPS[name][0]
    x = jnp.ones((8, 6))
    for bad in (-1.0, -1, 0.0, float("nan"), float("inf")):
        _raises(ValueError, rf"^{name}: epsilon must be > 0 and finite \(it makes the "
                rf"covariance positive definite.*\); got {bad!r}$", op, x, epsilon=bad)  # fmt: skip
    _raises(TypeError, rf"{name}: epsilon must be a finite float", op, x, epsilon=True)


@pytest.mark.parametrize("name", list(OPS))
def test_float32_gradient_at_huge_feature_scales(name):
    """Features of standard deviation 1e13 and 1e16 in float32: dx equals the float64
    gradient to the float32 tolerance 1e-4 of its largest entry (measured at most 8.2e-7).
    ZCA's divided difference -1/(r_i r_k (r_i + r_k)) overflowed float32 in its
    denominator once r = sqrt(λ) passed about 7e12, and became -0: the covariance term
    of dx vanished and dx was 45% off here, finite and silent."""
    op = OPS[name][0]
    x = _data((32, 4), jnp.float32, 5)
    dy = _data((32, 4), jnp.float32, 6)
    with jax.enable_x64(True):
        for scale in (1e13, 1e16):

            def grad(x, s=scale):
                return jax.grad(lambda x: jnp.sum(op(x * s)[0] * dy.astype(x.dtype)))(x)

            g32, g64 = grad(x), grad(x.astype(jnp.float64))
            err = float(jnp.max(jnp.abs(g32 - g64)) / jnp.max(jnp.abs(g64)))
            assert err < 1e-4, (scale, err)


def test_zca_reference_gradient_at_large_eigenvalues():
    """float16 features of standard deviation 5e3 (covariance eigenvalues above 2**24):
    autodiff of the reference, and so ZCANorm(use_autodiff=True), was NaN in dx (JAX's
    eigh derivative forms (1 + λ_j) - λ_i, 0 on its diagonal there); the reference now
    whitens Σ / (tr Σ / n). Op and reference agree to float16's tolerance."""
    from jax_batchinhib import linen as bnn

    x = (5e3 * _data((64, 8), jnp.float32, 7)).astype(jnp.float16)
    errs = check_vjp(jb.zca_norm, ref.zca_norm, x, raise_on_error=False)
    assert all(np.isfinite(e.max_rel) and e.ok for e in errs.values()), errs
    m = bnn.ZCANorm(use_autodiff=True)
    v = m.init(jax.random.key(1), x, use_running_average=False)
    dx = jax.grad(
        lambda x: jnp.sum(
            m.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0].astype(jnp.float32)
        )
    )(x)
    assert bool(jnp.isfinite(dx).all())


# ------------------------------------------- ZCA's second order at equal eigenvalues


def _rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_zca_second_order_at_equal_eigenvalues(mode):
    """Second derivatives of zca_norm where Σ has a double eigenvalue (a relative gap of
    0) or nearly one (1e-10), against the Newton-Schulz reference run to convergence
    (autodiff of ref.iter_norm with 14 steps: matmuls only, exact to round-off there).
    float64; tolerance 1e-12 of the largest entry, measured 2e-16 to 4e-16.

    Before W(Σ) and Σ̄ became custom-JVP functions of Σ, second derivatives went
    through JAX's derivative of eigh and its 1/(λ_k − λ_i): NaN at gap 0, 6e-7 at 1e-10.
    ``reverse_over_reverse`` is a Hessian-vector product (grad of <grad, v>),
    ``forward_over_reverse`` the whole jax.hessian."""
    with jax.enable_x64(True):
        base = _equal_variance_pair()
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(base.shape))
        v = jnp.asarray(np.random.default_rng(1).standard_normal(base.shape))

        def second(op):
            loss = lambda x: jnp.sum(jnp.sin(op(x)[0]) * ct)  # noqa: E731
            if mode == "forward_over_reverse":
                return jax.jit(jax.hessian(loss))
            return jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v)))

        ours, newton = second(jb.zca_norm), second(functools.partial(ref.iter_norm, iterations=14))
        for gap in (0.0, 1e-10):
            x = base * jnp.array([1.0, 1.0 + gap / 2])
            err = _rel(ours(x), newton(x))
            assert err < 1e-12, (gap, err)


@pytest.mark.parametrize("shape", [(4, 6), (8, 16)])
def test_zca_second_order_with_fewer_rows_than_features(shape):
    """A batch with fewer rows than features (m ≤ n) has a rank-deficient covariance, so
    Σ + εI has the eigenvalue ε with multiplicity n − m + 1: the usual case of a repeated
    eigenvalue in training. The Hessian-vector product equals central differences of the
    (exact, first-order) gradient along v: step 1e-5, truncation error ~1e-10 relative
    (measured 5.7e-10 and 5.5e-10; 4.8e-8 at step 1e-4, so it is the truncation), held
    at 1e-8. Autodiff of the eigh reference misses by 0.70 at (4, 6), finite but wrong,
    and is NaN at (8, 16) (its 1/(λ_k − λ_i) meets eigenvalues equal up to round-off;
    0.48 and 0.85 before the reference divided Σ by its mean eigenvalue); the rule's
    previous second derivatives, which went through eigh too, missed by 0.46 and were
    NaN."""
    with jax.enable_x64(True):
        x = _data(shape, jnp.float64, 7)
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
        v = _data(shape, jnp.float64, 8)

        def hvp(op):
            g = jax.grad(lambda x: jnp.sum(jnp.sin(op(x, epsilon=0.5)[0]) * ct))
            return g, jax.grad(lambda x: jnp.vdot(g(x), v))

        g, h = jax.jit(hvp(jb.zca_norm)[0]), jax.jit(hvp(jb.zca_norm)[1])
        step = 1e-5
        fd = (g(x + step * v) - g(x - step * v)) / (2 * step)
        assert _rel(h(x), fd) < 1e-8
        miss = _rel(jax.jit(hvp(ref.zca_norm)[1])(x), fd)
        assert not miss < 0.1, miss  # the case is a hard one: far off, or NaN


@pytest.mark.parametrize("groups", [1, 2])
def test_zca_third_order_at_distinct_eigenvalues(groups):
    """A third derivative (grad of <grad of <grad, v>, v>) goes through the last custom
    JVP's U and r, by autodiff of eigh: exact where the eigenvalues are distinct. Against
    autodiff of the eigh reference, float64, with scale and bias: 1e-10 of the largest
    entry, measured 2.4e-14 and 3.7e-15. (At a repeated eigenvalue it is NaN, as the
    reference's is; IterNorm's are finite.)"""
    with jax.enable_x64(True):
        x = _data((10, 6), jnp.float64, 3)
        sc, b = 1 + 0.1 * _data((6,), jnp.float64, 4), _data((6,), jnp.float64, 5)
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape))
        v = _data(x.shape, jnp.float64, 9)

        def third(op):
            loss = lambda x: jnp.sum(jnp.sin(op(x, sc, b, groups=groups)[0]) * ct)  # noqa: E731
            h = lambda x: jnp.vdot(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x), v)  # noqa: E731
            return jax.jit(jax.grad(h))

        assert _rel(third(jb.zca_norm)(x), third(ref.zca_norm)(x)) < 1e-10
