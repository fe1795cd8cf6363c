"""The functional core: every hand-derived VJP against autodiff of its reference.

Tolerances (relative, normwise: max|ours - autodiff| / max|autodiff|) follow from the
dtype: 1e-10 in float64 (round-off ~1e-16 times the conditioning of the small
reductions and matmuls here) and 1e-4 in float32 (eps 1.2e-7 times the same), see
``jax_batchinhib.testing.TOLERANCES``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp


def _data(shape, dtype, seed=0, corr=True):
    """Random data with correlated features and non-zero means (a realistic batch)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape, jnp.float32)
    if corr and shape[-1] > 1:
        mix = jnp.eye(shape[-1]) + 0.5 * jax.random.normal(k2, (shape[-1], shape[-1])) / np.sqrt(
            shape[-1]
        )
        x = x @ mix
    return (x * 1.5 + 0.3).astype(dtype)


def _vec(n, dtype, seed):
    return (1.0 + 0.3 * jax.random.normal(jax.random.key(seed), (n,))).astype(dtype)


def _alpha(n, groups, dtype, seed=3):
    return jax.random.normal(jax.random.key(seed), jb.alpha_shape(n, groups), jnp.float32).astype(
        dtype
    )


def _cases(shape, dtype, axis=-1, groups=1, seed=0):
    """(name, op, reference, args, kwargs) for every op at this shape."""
    x = _data(shape, dtype, seed)
    n = shape[axis]
    sc, b = _vec(n, dtype, seed + 1), _vec(n, dtype, seed + 2) - 1.0
    alpha = _alpha(n, groups, dtype, seed + 3)
    _, st = ref.batch_inhib(x, alpha, axis=axis, groups=groups)
    cov = st.cov[0] if groups == 1 else st.cov
    labels = jax.nn.softmax(_data(shape, dtype, seed + 5).astype(jnp.float32), axis=-1).astype(
        dtype
    )
    var = jnp.exp(0.3 * _vec(n, dtype, seed + 4))
    return [
        ("batch_norm", jb.batch_norm, ref.batch_norm, (x, sc, b), dict(axis=axis)),
        ("batch_center", jb.batch_center, ref.batch_center, (x, b), dict(axis=axis)),
        (
            "batch_inhib",
            jb.batch_inhib,
            ref.batch_inhib,
            (x, alpha),
            dict(axis=axis, groups=groups),
        ),
        (
            "batch_norm_inference",
            jb.batch_norm_inference,
            ref.batch_norm_inference,
            (x, sc, b, b, var),
            dict(axis=axis),
        ),
        (
            "batch_center_inference",
            jb.batch_center_inference,
            ref.batch_center_inference,
            (x, b, sc),
            dict(axis=axis),
        ),
        (
            "batch_inhib_inference",
            jb.batch_inhib_inference,
            ref.batch_inhib_inference,
            (x, alpha, cov.astype(dtype)),
            dict(axis=axis, groups=groups),
        ),
        ("softmax", jb.softmax, ref.softmax, (x,), dict(axis=axis)),
        (
            "softmax_cross_entropy",
            jb.softmax_cross_entropy,
            ref.softmax_cross_entropy,
            (x, labels),
            {},
        ),
        (
            "softmax_cross_entropy_with_integer_labels",
            jb.softmax_cross_entropy_with_integer_labels,
            ref.softmax_cross_entropy_with_integer_labels,
            (x, jax.random.randint(jax.random.key(seed + 6), shape[:-1], 0, shape[-1])),
            {},
        ),
        ("dropout", jb.dropout, ref.dropout, (x, 0.25, jax.random.key(seed + 7)), {}),
    ]


# float64 check_vjp tolerance in this file (the library default is 1e-10); measured at
# most 5e-15, except batch_inhib at (512, 256): 1.2e-12 (256 features, a 256x256 R)
F64_RTOL = 1e-11


#: float32 BatchInhib at 256 features with a random-normal alpha and the signed denominator
#: is ill-conditioned: min |D| = 4.6e-3, and 1/D amplifies round-off. Op and reference are
#: each within 7e-5 of the float64 result (measured: op 4.4e-5, reference 6.8e-5, relative
#: to max |y|), so they can sit 2.3e-4 apart from each other (measured: output 1.6e-4, x
#: 2.0e-4, alpha 2.3e-4). There they are compared with each other at 1e-3 and the op's
#: output with float64 truth at 1e-4 (_inhib_float64_truth).
ILL_CONDITIONED_F32_RTOL = 1e-3


def _first(out):
    """The primary output: ``y`` of an op that returns ``(y, stats)``."""
    return out[0] if isinstance(out, tuple) else out


def _inhib_float64_truth(op, rf, args, kw):
    y32 = jax.jit(lambda *a: _first(op(*a, **kw)))(*args)
    with jax.enable_x64(True):
        y64 = _first(rf(*[a.astype(jnp.float64) for a in args], **kw))
        err = float(jnp.max(jnp.abs(y32.astype(jnp.float64) - y64)) / jnp.max(jnp.abs(y64)))
    assert err < 1e-4, (op.__name__, err)


def _check_all(shape, dtype, axis=-1, groups=1, seed=0, only=None):
    for name, op, rf, args, kw in _cases(shape, dtype, axis, groups, seed):
        if only and name not in only:
            continue
        # float64: F64_RTOL (max|ours - autodiff| / max|autodiff|, measured above)
        rtol = F64_RTOL if jnp.dtype(dtype) == jnp.float64 else None
        if jnp.dtype(dtype) == jnp.float32 and name.startswith("batch_inhib") and shape[-1] >= 256:
            rtol = ILL_CONDITIONED_F32_RTOL
            _inhib_float64_truth(op, rf, args, kw)
        check_vjp(op, rf, *args, rtol=rtol, **kw)


# ------------------------------------------------------------------ VJP vs autodiff


@pytest.mark.parametrize("shape", [(2, 1), (8, 4, 4, 16), (512, 256)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vjp_matches_reference(shape, dtype):
    with jax.enable_x64(dtype == "float64"):
        _check_all(shape, jnp.dtype(dtype), groups=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vjp_matches_reference_grouped_nhwc(dtype):
    with jax.enable_x64(dtype == "float64"):
        _check_all(
            (8, 4, 4, 16), jnp.dtype(dtype), groups=4, only={"batch_inhib", "batch_inhib_inference"}
        )


@pytest.mark.parametrize(
    "kw",
    [
        dict(correlation="variance"),
        dict(denominator="abs"),
        dict(rho=4.0, epsilon=1e-3),
        dict(groups=2, denominator="abs", correlation="variance"),
        dict(guard_mode="relative"),
        dict(guard_mode="relative", guard=0.05, rho=4.0),
        dict(guard_mode="relative", groups=2, denominator="abs", correlation="variance"),
    ],
    ids=str,
)
def test_batch_inhib_options_match_reference(kw):
    with jax.enable_x64(True):
        x = _data((24, 6), jnp.float64, 1)
        alpha = _alpha(6, kw.get("groups", 1), jnp.float64)
        check_vjp(jb.batch_inhib, ref.batch_inhib, x, alpha, rtol=F64_RTOL, **kw)
        _, st = ref.batch_inhib(x, alpha, **kw)
        cov = st.cov if kw.get("groups", 1) > 1 else st.cov[0]
        check_vjp(
            jb.batch_inhib_inference, ref.batch_inhib_inference, x, alpha, cov, rtol=F64_RTOL, **kw
        )


def test_masked_statistics_match_reference():
    with jax.enable_x64(True):
        x = _data((4, 5, 6), jnp.float64, 2)
        rows = jax.random.bernoulli(jax.random.key(9), 0.6, (4, 5)).at[0, 0].set(True)
        full = jax.random.bernoulli(jax.random.key(8), 0.6, (4, 5, 6)).at[0, 0].set(True)
        sc, b = _vec(6, jnp.float64, 1), _vec(6, jnp.float64, 2)
        for m in (rows, full):
            check_vjp(jb.batch_norm, ref.batch_norm, x, sc, b, mask=m)
            check_vjp(jb.batch_center, ref.batch_center, x, b, mask=m)
        check_vjp(
            jb.batch_inhib, ref.batch_inhib, x, _alpha(6, 2, jnp.float64), mask=rows, groups=2
        )
        # masked statistics equal those of the valid rows alone
        _, s = jb.batch_norm(x, sc, b, mask=rows)
        sel = x[np.asarray(rows)]
        np.testing.assert_allclose(s.mean, sel.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.var, sel.var(0), rtol=1e-12)
        _, si = jb.batch_inhib(x, _alpha(6, 1, jnp.float64), mask=rows)
        np.testing.assert_allclose(si.cov[0], np.cov(np.asarray(sel).T, bias=True), rtol=1e-10)


def test_gradient_flows_through_statistics():
    """batch_norm/batch_center stats are differentiable outputs; batch_inhib's are not."""
    with jax.enable_x64(True):
        x = _data((10, 3), jnp.float64)

        def loss(op, x):
            y, s = op(x, None, None)
            return jnp.sum(y**2 * 0.1) + jnp.sum(s.mean**3) + jnp.sum(jnp.sin(s.var))

        g = jax.grad(lambda x: loss(jb.batch_norm, x))(x)
        gr = jax.grad(lambda x: loss(ref.batch_norm, x))(x)
        np.testing.assert_allclose(g, gr, rtol=1e-10, atol=1e-12)
        gc = jax.grad(lambda x: jnp.sum(jb.batch_center(x)[1].mean ** 2))(x)
        np.testing.assert_allclose(gc, jnp.broadcast_to(2 * x.mean(0) / 10, x.shape), rtol=1e-12)
        gi = jax.grad(lambda x: jnp.sum(jb.batch_inhib(x, jnp.zeros((3, 3)))[1].cov))(x)
        assert not np.any(gi), "batch_inhib statistics are documented as stop-gradient"


@pytest.mark.parametrize("groups", [1, 2])
def test_batch_inhib_relative_guard_float32(groups):
    """guard_mode="relative" in float32: the rule against autodiff of the reference at the
    float32 tolerance (1e-4), training and inference forms."""
    x = _data((24, 6), jnp.float32, 2)
    alpha = _alpha(6, groups, jnp.float32, 4)
    kw = dict(guard_mode="relative", groups=groups)
    check_vjp(jb.batch_inhib, ref.batch_inhib, x, alpha, **kw)
    cov = ref.batch_inhib(x, alpha, **kw)[1].cov
    cov = cov if groups > 1 else cov[0]
    check_vjp(jb.batch_inhib_inference, ref.batch_inhib_inference, x, alpha, cov, **kw)


_ALPHA_LEVELS = (-12.0, 0.0, 12.0)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _guard_rows(covs, delta, mode):
    """R (levels, B, 3, 3) for each alpha level (alpha constant) and each covariance of the
    stack covs (B, 3, 3)."""
    levels = jnp.asarray(_ALPHA_LEVELS, covs.dtype)
    return jax.vmap(
        lambda a: jax.vmap(
            lambda c: jb.inhibition_matrix(
                c, jnp.full((3, 3), a, c.dtype), guard=delta, guard_mode=mode, epsilon=0.0
            )[0]
        )(covs)
    )(levels)


def test_relative_guard_bounds_every_row():
    """guard_mode="relative": sum_k |R_ik| <= 1/(2 delta) whatever the scale of g, also where
    the signed denominator crosses zero; the absolute guard allows A/(2 delta) there. R does
    not depend on a constant level of alpha (g cancels), and a group of one feature (no
    off-diagonal weight, A = D = 0) gives R = 0 with finite gradients."""
    with jax.enable_x64(True):
        # r12 = 0.5, r13 sweeps through -0.5, where D_1 = g (r12 + r13) crosses zero
        r13 = jnp.linspace(-0.52, -0.48, 4001)
        covs = jax.vmap(lambda c: jnp.array([[1.0, 0.5, c], [0.5, 1.0, 0.0], [c, 0.0, 1.0]]))(r13)
        for delta in (0.1, 0.5):
            rel = np.asarray(_guard_rows(covs, delta, "relative"))
            ab = np.asarray(_guard_rows(covs, delta, "absolute"))
            # float64: the bound holds up to round-off (1e-12 relative), at every alpha level
            assert np.abs(rel).sum(-1).max() <= (1 + 1e-12) / (2 * delta), delta
            # alpha = 12: g ~ 12, A_1 ~ 12, and the absolute guard lets sum_k |R_1k| reach
            # ~A/(2 delta) near D = 0
            assert np.abs(ab[2]).sum(-1).max() > 5.0 / (2 * delta), delta
            # g cancels between the numerator and A, D; tau^2 = 1e-24 against A^2 ~ 1e-10
            # at alpha = -12: agreement to float64 round-off (1e-10)
            np.testing.assert_allclose(rel[0], rel[1], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(rel[2], rel[1], rtol=1e-10, atol=1e-12)
        x = _data((16, 4), jnp.float64, 6)
        f = jax.value_and_grad(
            lambda x, a: jnp.sum(jnp.sin(jb.batch_inhib(x, a, groups=4, guard_mode="relative")[0])),
            argnums=(0, 1),
        )
        v, (gx, ga) = f(x, jnp.zeros((4, 1, 1)))
        np.testing.assert_array_equal(v, jnp.sum(jnp.sin(x)))  # R = 0: y = x exactly
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(ga))
        _raises(
            ValueError,
            r"batch_inhib: guard_mode must be one of \('absolute', 'relative'\); got 'rel'",
            jb.batch_inhib,
            x,
            jnp.zeros((4, 4)),
            guard_mode="rel",
        )


# ------------------------------------------------------------ higher order, transforms


def _second_order_cases():
    x = _data((6, 3), jnp.float64, 4)
    sc, b = _vec(3, jnp.float64, 1), _vec(3, jnp.float64, 2)
    alpha = _alpha(3, 1, jnp.float64)
    lab = jax.nn.softmax(_data((6, 3), jnp.float64, 5))
    key = jax.random.key(0)
    return {
        "batch_norm": (lambda x, s, b: jb.batch_norm(x, s, b)[0], (x, sc, b)),
        "batch_center": (lambda x, b: jb.batch_center(x, b)[0], (x, b)),
        "batch_inhib": (lambda x, a: jb.batch_inhib(x, a)[0], (x, alpha)),
        "batch_inhib_abs_var": (
            lambda x, a: jb.batch_inhib(x, a, denominator="abs", correlation="variance")[0],
            (x, alpha),
        ),
        "batch_inhib_relative": (
            lambda x, a: jb.batch_inhib(x, a, guard_mode="relative")[0],
            (x, alpha),
        ),
        "batch_inhib_inference": (
            lambda x, a, c: jb.batch_inhib_inference(x, a, c),
            (x, alpha, jnp.cov(x.T) + 0.1),
        ),
        "batch_norm_inference": (
            lambda x, s, b: jb.batch_norm_inference(x, s, b, b, s**2),
            (x, sc, b),
        ),
        "softmax": (lambda x: jb.softmax(x), (x,)),
        "softmax_cross_entropy": (lambda x, t: jb.softmax_cross_entropy(x, t), (x, lab)),
        "dropout": (lambda x: jb.dropout(x, 0.5, key), (x,)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "batch_norm",
        "batch_center",
        "batch_inhib",
        "batch_inhib_abs_var",
        "batch_inhib_relative",
        "batch_inhib_inference",
        "batch_norm_inference",
        "softmax",
        "softmax_cross_entropy",
        "dropout",
    ],
)
def test_second_order_finite_differences(name):
    """grad of grad by finite differences (float64), through the custom rules."""
    with jax.enable_x64(True):
        f, args = _second_order_cases()[name]
        # float64 central differences with eps=1e-4: truncation error ~eps^2 times the third
        # derivative: ~1e-8 for most ops, so 1e-7 is ten times it; BatchInhib's guarded 1/D
        # has a larger third derivative (measured 2.2e-6 relative on batch_inhib), so 2e-5
        # there (jax's check_grads compares with atol + rtol * |expected|)
        tol = 2e-5 if name.startswith("batch_inhib") else 1e-7
        check_grads(jax.jit(f), args, order=2, modes=["rev"], atol=tol, rtol=tol, eps=1e-4)


def test_hessian_vector_product_matches_reference():
    with jax.enable_x64(True):
        x = _data((6, 3), jnp.float64, 4)
        alpha = _alpha(3, 1, jnp.float64)

        # Hessian-vector product of a scalar loss through the custom rule vs the reference
        def loss(op):
            return lambda x: jnp.sum(jnp.tanh(op(x, alpha)[0]))

        v = _data((6, 3), jnp.float64, 6)
        # jitted: op by op, the nested grads compile every primitive on its own (~35 s)
        hvp = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss(jb.batch_inhib))(x), v)))(x)
        hvp_ref = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss(ref.batch_inhib))(x), v)))(x)
        np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-9, atol=1e-11)


def test_forward_over_reverse_matches_reference():
    """jax.hessian (jacfwd of jacrev) of each op equals the reference's (float64,
    round-off). The inference forms' fwd rules called the custom_vjp function itself, so
    the outer jvp met a custom_vjp: "can't apply forward-mode autodiff (jvp) to a
    custom_vjp function", while the training forms worked."""
    with jax.enable_x64(True):
        x = _data((5, 3), jnp.float64, 11)
        s, b = _data((3,), jnp.float64, 12), _data((3,), jnp.float64, 13)
        mean, var = _data((3,), jnp.float64, 14), jnp.exp(_data((3,), jnp.float64, 15))
        alpha = _alpha(3, 1, jnp.float64)
        xs = _data((10, 3), jnp.float64, 16)
        cov = xs.T @ xs / 10
        _, st = jb.zca_norm(xs, s, b)
        cases = {
            "batch_norm": lambda m, x: m.batch_norm(x, s, b)[0],
            "batch_inhib": lambda m, x: m.batch_inhib(x, alpha)[0],
            "zca_norm": lambda m, x: m.zca_norm(x, s, b)[0],
            "softmax_cross_entropy": lambda m, x: m.softmax_cross_entropy(x, jnp.abs(xs[:5])),
            "batch_norm_inference": lambda m, x: m.batch_norm_inference(x, s, b, mean, var),
            "batch_center_inference": lambda m, x: m.batch_center_inference(x, b, mean),
            "batch_inhib_inference": lambda m, x: m.batch_inhib_inference(x, alpha, cov),
            "iter_norm_inference": lambda m, x: m.iter_norm_inference(
                x, s, b, st.mean, st.whitening_matrix
            ),
            "zca_norm_inference": lambda m, x: m.zca_norm_inference(
                x, s, b, st.mean, st.whitening_matrix
            ),
        }
        for name, f in cases.items():
            got, want = (
                jax.jit(jax.hessian(lambda x, m=m, f=f: jnp.sum(jnp.sin(f(m, x)))))(x)
                for m in (jb, ref)
            )
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)


def _loss_fns():
    alpha = _alpha(4, 2, jnp.float32)

    def bn(x):
        y, s = jb.batch_norm(x, jnp.full((4,), 1.5), jnp.full((4,), 0.1))
        return jnp.sum(jnp.sin(y)) + jnp.sum(s.var)

    def bi(x):
        return jnp.sum(jnp.sin(jb.batch_inhib(x, alpha, groups=2)[0]))

    def bc(x):
        return jnp.sum(jnp.sin(jb.batch_center(x)[0]))

    def sce(x):
        return jnp.sum(jb.softmax_cross_entropy(x, jb.softmax(x * 0.5)))

    return {"bn": bn, "bi": bi, "bc": bc, "sce": sce}


@pytest.mark.parametrize("name", ["bn", "bi", "bc", "sce"])
def test_jit_vmap_checkpoint_agree(name):
    f = _loss_fns()[name]
    xs = _data((3, 16, 4), jnp.float32, 7)  # a leading ensemble axis of 3 models
    vg = jax.value_and_grad(f)
    eager = [vg(x) for x in xs]
    jitted = jax.jit(vg)(xs[0])
    vm = jax.vmap(vg)(xs)
    ck = jax.jit(jax.value_and_grad(jax.checkpoint(f)))(xs[0])
    tol = dict(rtol=2e-5, atol=2e-5)  # float32: same math, different fusion order
    np.testing.assert_allclose(jitted[0], eager[0][0], **tol)
    np.testing.assert_allclose(jitted[1], eager[0][1], **tol)
    np.testing.assert_allclose(ck[0], eager[0][0], **tol)
    np.testing.assert_allclose(ck[1], eager[0][1], **tol)
    for i in range(3):
        np.testing.assert_allclose(vm[0][i], eager[i][0], **tol)
        np.testing.assert_allclose(vm[1][i], eager[i][1], **tol)


# --------------------------------------------------------------------- dtypes, numerics


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs(dtype):
    dtype = jnp.dtype(dtype)
    x = _data((64, 8), dtype, 3) + 8.0  # an offset that float16 sums would lose
    y, s = jb.batch_norm(x, jnp.ones(8, dtype), jnp.zeros(8, dtype))
    assert y.dtype == dtype and s.mean.dtype == jnp.float32 and s.var.dtype == jnp.float32
    x32 = x.astype(jnp.float32)
    np.testing.assert_allclose(s.mean, x32.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.var, x32.var(0), rtol=1e-5)
    yi, si = jb.batch_inhib(x, _alpha(8, 2, dtype), groups=2)
    assert yi.dtype == dtype and si.cov.dtype == jnp.float32
    for name, op, rf, args, kw in _cases((64, 8), dtype, groups=2):
        assert jax.tree.leaves(op(*args, **kw))[0].dtype == dtype, name
        if name in ("batch_norm", "batch_inhib", "softmax_cross_entropy"):
            check_vjp(op, rf, *args, **kw)  # tolerance: 2 ulps of the dtype


@pytest.mark.parametrize("fast", [True, False], ids=["one_pass", "two_pass"])
def test_variance_survives_large_mean(fast):
    """float32 data with mean 1e4 and std 1e-2 normalize to 1e-3 of the float64 result,
    with either variance algorithm (the shifted one-pass and the shifted two-pass)."""
    x = (1e4 + 1e-2 * jax.random.normal(jax.random.key(0), (4096, 8))).astype(jnp.float32)
    with jax.enable_x64(True):
        x64 = np.asarray(x, np.float64)
        want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    y, s = jax.jit(lambda x: jb.batch_norm(x, use_fast_variance=fast))(x)
    err = np.max(np.abs(np.asarray(y, np.float64) - want))
    assert err < 3e-6, err  # measured here: 3e-7 (float32 round-off of values of order 1)
    # float32 sums of 4096 shifted terms: a few ulps (measured 8e-8 two-pass, 2e-7 one-pass)
    np.testing.assert_allclose(s.var, x64.var(0), rtol=1e-5)

    # plain (unshifted) two-pass float32 loses to the rounded mean: about 3e-2
    mu = jnp.mean(x, 0)
    y_naive = (x - mu) / jnp.sqrt(jnp.mean((x - mu) ** 2, 0) + 1e-5)
    err_naive = np.max(np.abs(np.asarray(y_naive, np.float64) - want))
    assert err_naive > 1e-2, err_naive

    # flax's default fast variance E[x^2] - E[x]^2 is off by a large factor: its round-off
    # is of order u mean² = 6 against a variance of 1e-4 (measured 9.6e3 to 1.03e4 times
    # the variance here; a variance of 0 would be as far off, so both sides are checked)
    bn = nn.BatchNorm(use_running_average=False, use_fast_variance=True, epsilon=1e-5)
    _, upd = bn.init_with_output(jax.random.key(0), x)
    ratio = np.asarray(upd["batch_stats"]["var"], np.float64) / x64.var(0)
    assert np.all((ratio > 100) | (ratio < 0.01)), ratio


@pytest.mark.parametrize(
    "options",
    [{}, {"guard_mode": "relative"}, {"denominator": "abs"},
     {"denominator": "abs", "guard_mode": "relative"}],
    ids=["signed", "relative_guard", "abs", "abs_relative_guard"],
)  # fmt: skip
def test_batch_inhib_constant_feature_gradients_equal_reference(options):
    """A constant feature (a dead ReLU unit: a column of zeros; or of 3s) has all its
    correlations exactly 0, where |r| (the abs denominator, the relative guard's Σ g|r|)
    has a kink. The rule takes the slope +1 there, as JAX's derivative of abs does, so
    dx, dalpha and (inference form) dcov equal autodiff of the reference. With jnp.sign's
    0 they differed by up to the size of the gradient itself (dx off by 824 of 825 with
    the abs denominator, float32) in the three configurations with the abs denominator
    or the relative guard. float64, 1e-10 of the largest entry of the
    gradients (dalpha is near 0 here, so each array is not scaled by its own)."""
    with jax.enable_x64(True):
        x = _data((16, 4), jnp.float64, 7).at[:, 1].set(0.0).at[:, 3].set(3.0)
        alpha = _alpha(4, 1, jnp.float64)
        dy = _data((16, 4), jnp.float64, 8, corr=False)
        cov = jnp.cov(x.T, bias=True)

        train = [
            jax.grad(lambda x, a, m=m: jnp.sum(m.batch_inhib(x, a, **options)[0] * dy), (0, 1))(
                x, alpha
            )
            for m in (jb, ref)
        ]
        inf = [
            jax.grad(
                lambda x, a, c, m=m: jnp.sum(m.batch_inhib_inference(x, a, c, **options) * dy),
                (0, 1, 2),
            )(x, alpha, cov)
            for m in (jb, ref)
        ]
        for got, want in (train, inf):
            scale = max(float(jnp.max(jnp.abs(w))) for w in want)
            for g, w in zip(got, want, strict=True):
                err = float(jnp.max(jnp.abs(g - w))) / scale
                assert err < 1e-10, (options, err)


def test_batch_inhib_finite_for_any_input():
    """The guarded denominator keeps y and the gradients finite: uncorrelated or
    constant features, alpha anywhere."""
    key = jax.random.key(5)
    xs = {
        "iid": jax.random.normal(key, (256, 6)),
        "constant_feature": jax.random.normal(key, (32, 6)).at[:, 2].set(3.0),
        "all_constant": jnp.ones((16, 6)),
        "anti": jnp.stack([jnp.arange(8.0), -jnp.arange(8.0)], -1),
    }
    grads = {
        den: jax.jit(
            jax.value_and_grad(
                lambda x, a, den=den: jnp.sum(jnp.tanh(jb.batch_inhib(x, a, denominator=den)[0])),
                argnums=(0, 1),
            )
        )
        for den in ("signed", "abs")
    }
    for name, x in xs.items():
        n = x.shape[-1]
        for a in (-30.0, 0.0, 30.0):
            for den in ("signed", "abs"):
                alpha = jnp.full((n, n), a).at[0, -1].set(-a)
                v, (gx, ga) = grads[den](x, alpha)
                assert np.isfinite(v) and np.all(np.isfinite(gx)) and np.all(np.isfinite(ga)), (
                    name,
                    a,
                    den,
                )


def test_softmax_cross_entropy_extreme_logits():
    z = jnp.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0]])
    t = jnp.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    v, g = jax.value_and_grad(lambda z: jnp.sum(jb.softmax_cross_entropy(z, t)))(z)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    # float32 near |z| = 1000 has an ulp of 6e-5: lse(z) - z cancels to that absolute error
    want = [2000.0, np.log(3.0)]
    np.testing.assert_allclose(jb.softmax_cross_entropy(z, t), want, rtol=1e-6, atol=2e-4)
    import optax

    np.testing.assert_allclose(
        jb.softmax_cross_entropy(z, t), optax.softmax_cross_entropy(z, t), rtol=1e-6, atol=2e-4
    )
    ga = jax.grad(lambda z: jnp.sum(jb.softmax(z) * t))(z)
    assert np.all(np.isfinite(ga))


def test_softmax_cross_entropy_masked_logits_are_finite():
    # A masked class (logit -inf, label 0) adds nothing, 0 log 0 = 0 (optax's
    # safe_softmax_cross_entropy): the loss and dz are those of the unmasked classes alone.
    inf = jnp.inf
    z = jnp.array([[1.0, -inf, 2.0, 0.5], [0.0, 0.0, -inf, -inf]])
    t = jnp.array([[0.7, 0.0, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    keep = np.isfinite(np.asarray(z))
    want_v, want_g = [], np.zeros(z.shape, np.float32)
    for i in range(z.shape[0]):
        zi, ti = z[i][keep[i]], t[i][keep[i]]
        v, g = jax.value_and_grad(lambda zi, ti=ti: ref.softmax_cross_entropy(zi, ti))(zi)
        want_v.append(float(v))
        want_g[i, keep[i]] = g
    loss = lambda f: lambda z, t: jnp.sum(f(z, t))  # noqa: E731
    # float32 sums of O(1) terms: a few ulps
    f = jb.softmax_cross_entropy
    v, (gz, gt) = jax.value_and_grad(loss(f), argnums=(0, 1))(z, t)
    np.testing.assert_allclose(f(z, t), want_v, rtol=1e-6)
    np.testing.assert_allclose(gz, want_g, rtol=1e-6, atol=1e-7)
    # dt = -log softmax(z) where that is finite
    logp = jax.nn.log_softmax(z)
    np.testing.assert_allclose(gt[keep], -logp[keep], rtol=1e-6)
    # the naive reference (and optax's softmax_cross_entropy) gives 0 * inf = NaN there
    assert np.all(np.isnan(ref.softmax_cross_entropy(z, t)))
    import optax

    np.testing.assert_allclose(
        jb.softmax_cross_entropy(z, t), optax.safe_softmax_cross_entropy(z, t), rtol=1e-6
    )
    # at a masked class dt is -log 0 = +inf (the loss is +inf for any label > 0 there)
    assert np.all(np.isposinf(np.asarray(gt)[~keep]))
    # ... where the op gives about t * finfo.max (the clamp), not NaN
    bad = jb.softmax_cross_entropy(z[:1], jnp.array([[0.5, 0.5, 0.0, 0.0]]))
    assert float(bad[0]) >= 0.5 * float(jnp.finfo(jnp.float32).max)


def test_integer_label_cross_entropy_equals_the_one_hot_op_and_optax():
    import optax

    f = jb.softmax_cross_entropy_with_integer_labels
    z = _data((6, 3, 5), jnp.float32, 4) * 3
    y = jax.random.randint(jax.random.key(5), (6, 3), 0, 5)
    ct = _data((6, 3), jnp.float32, 6)

    def vg(fn, z, *a, **k):
        return jax.value_and_grad(lambda z: jnp.sum(fn(z, *a, **k) * ct))(z)

    # float32: a few ulps of the largest entry (measured: 2.4e-7 absolute against a
    # largest gradient of 2.1, 2.0e-6 relative at the smallest entries)
    for other in (
        vg(jb.softmax_cross_entropy, z, jax.nn.one_hot(y, 5)),
        vg(optax.softmax_cross_entropy_with_integer_labels, z, y),
    ):
        for a, b in zip(vg(f, z, y), other, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the class axis elsewhere
    zt = jnp.moveaxis(z, -1, 1)
    for a, b in zip(vg(f, zt, y, axis=1), vg(f, z, y), strict=True):
        np.testing.assert_allclose(jnp.moveaxis(a, 1, -1) if a.ndim == 3 else a, b, rtol=1e-6)
    # bfloat16 logits (the recompute path) against float32 on the same values: each loss
    # is float32's rounded to bfloat16, within half an ulp (<= 2^-8 relative; measured
    # 3.3e-3); dz within one ulp (<= 2^-7 relative; measured 5.5e-3), since the recomputed
    # exp and float32's kept one differ in their last bits and may round to neighbours
    zb = z.astype(jnp.bfloat16)
    vb, gb = vg(f, zb, y)
    assert gb.dtype == jnp.bfloat16
    v32, g32 = vg(f, zb.astype(jnp.float32), y)
    np.testing.assert_allclose(
        f(zb, y).astype(jnp.float32), f(zb.astype(jnp.float32), y), rtol=2**-8, atol=0
    )
    np.testing.assert_allclose(jnp.float32(vb), v32, rtol=2**-8)
    np.testing.assert_allclose(gb.astype(jnp.float32), g32, rtol=2**-7, atol=0)
    # a masked class (logit -inf) other than the label adds nothing, finitely
    zm = z.at[..., 0].set(-jnp.inf)
    ym = jnp.maximum(y, 1)
    v, g = vg(f, zm, ym)
    vo, go = vg(f, z[..., 1:], ym - 1)
    np.testing.assert_allclose(v, vo, rtol=1e-6)
    np.testing.assert_allclose(g[..., 1:], go, rtol=1e-5, atol=1e-7)
    assert np.all(g[..., 0] == 0)
    # a negative label counts from the end, as optax's
    yn = y.at[0, 0].set(-1)
    np.testing.assert_allclose(vg(f, z, yn)[1], vg(f, z, y.at[0, 0].set(4))[1], rtol=1e-6)
    np.testing.assert_allclose(
        f(z, yn), optax.softmax_cross_entropy_with_integer_labels(z, yn), rtol=1e-6
    )
    # a label out of range: NaN loss and dz = g softmax(z), as optax's
    yb = y.at[0, 0].set(5)
    assert np.isnan(f(z, yb)[0, 0]) and np.isfinite(f(z, yb)[1:]).all()
    g = jax.grad(lambda z: jnp.sum(f(z, yb)[0, 0] * 1.0))(z)
    np.testing.assert_allclose(g[0, 0], jax.nn.softmax(z[0, 0]), rtol=1e-6)
    # second order: the backward is differentiable (grad of grad against the reference)
    r = ref.softmax_cross_entropy_with_integer_labels
    gg = [
        jax.grad(lambda z, fn=fn: jnp.sum(jax.grad(lambda z: jnp.sum(fn(z, y) * ct))(z) ** 2))(z)
        for fn in (f, r)
    ]
    # float32 second derivatives: measured 4.8e-7 absolute against a largest entry of 2.5
    np.testing.assert_allclose(gg[0], gg[1], rtol=1e-5, atol=1e-6)
    # jit and vmap
    np.testing.assert_allclose(jax.jit(f)(z, y), jax.vmap(f)(z, y), rtol=1e-6)


def test_integer_label_cross_entropy_errors():
    f = jb.softmax_cross_entropy_with_integer_labels
    z = jnp.zeros((4, 3))
    name = "softmax_cross_entropy_with_integer_labels"
    want = rf"{name}: labels must be integer class indices; got dtype float32\. For labels "
    want += r"as probabilities .* use softmax_cross_entropy"
    with pytest.raises(TypeError, match=want):
        f(z, jnp.zeros((4,)))
    want = rf"{name}: labels must have the shape of logits \(4, 3\) without axis 1, \(4,\); "
    with pytest.raises(ValueError, match=want + r"got \(4, 3\)"):
        f(z, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=rf"{name}: logits must have at least one dimension"):
        f(jnp.float32(0), jnp.int32(0))
    with pytest.raises(TypeError, match=rf"{name}: logits must be"):
        f(jnp.zeros((4, 3), jnp.int32), jnp.zeros((4,), jnp.int32))


def test_dropout_edge_rates():
    x = _data((16, 8), jnp.float32)
    key = jax.random.key(1)
    assert jb.dropout(x, 0.0, key) is x
    g1 = jax.grad(lambda x: jnp.sum(jb.dropout(x, 1.0, key)))(x)
    assert not np.any(jb.dropout(x, 1.0, key)) and np.all(g1 == 0)
    y = jb.dropout(x, 0.5, key)
    # the mask drawn as flax.linen.Dropout draws it, not by the op's own helper
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    assert 0 < keep.sum() < keep.size
    np.testing.assert_allclose(y, np.where(keep, 2 * np.asarray(x), 0), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(jb.dropout(x, 0.5, key) * 3.0))(x)
    np.testing.assert_allclose(g, np.where(keep, 6.0, 0.0), rtol=1e-6)


# --------------------------------------------------------------- what the backward keeps


def _residual_bytes(f, *args):
    _, vjp_fn = jax.vjp(f, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn) if hasattr(leaf, "nbytes"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_residuals_batch_norm(dtype):
    # The README's claim: ours keeps x and per-feature vectors, autodiff of the reference
    # at least three float32 arrays of x's size (a third of its bytes in float32, a sixth
    # in bfloat16).
    m, n = 256, 64
    x = _data((m, n), dtype)
    sc, b = _vec(n, dtype, 1), _vec(n, dtype, 2)
    ours = _residual_bytes(lambda x, s, b: jb.batch_norm(x, s, b)[0], x, sc, b)
    auto = _residual_bytes(lambda x, s, b: ref.batch_norm(x, s, b)[0], x, sc, b)
    assert ours <= x.nbytes + 16 * n * 4, (ours, x.nbytes)
    assert auto >= 3 * x.size * 4, (auto, x.size)


def test_residuals_batch_inhib():
    m, n = 256, 32
    x = _data((m, n), jnp.float32)
    alpha = _alpha(n, 1, jnp.float32)
    ours = _residual_bytes(lambda x, a: jb.batch_inhib(x, a)[0], x, alpha)
    auto = _residual_bytes(lambda x, a: ref.batch_inhib(x, a)[0], x, alpha)
    # O(m*N + N^2): x, alpha and the covariance, plus per-feature vectors
    assert ours <= x.nbytes + 2 * n * n * 4 + 16 * n * 4, (ours, x.nbytes)
    assert ours < auto, (ours, auto)
    # dropout keeps the mask packed to bits by default (x.size / 8 bytes), or the key alone
    kd = _residual_bytes(lambda x: jb.dropout(x, 0.3, jax.random.key(0)), x)
    kk = _residual_bytes(lambda x: jb.dropout(x, 0.3, jax.random.key(0), residual="key"), x)
    ka = _residual_bytes(lambda x: ref.dropout(x, 0.3, jax.random.key(0)), x)
    assert kd == x.size // 8 and kk < 64 and ka >= x.size, (kd, kk, ka)


# ------------------------------------------------------------------------------ errors


def _raises(exc, match, f, *a, **k):
    with pytest.raises(exc, match=match):
        f(*a, **k)


def test_alpha_shape_checks_its_arguments():
    assert jb.alpha_shape(6) == (6, 6) and jb.alpha_shape(6, 3) == (3, 2, 2)
    # it returned (2, 2, 2) for (5, 2), (8, 0, 0) for (4, 8) and (4, 4) for groups=True
    _raises(ValueError, r"alpha_shape: groups=2 must divide the number of features N=5",
            jb.alpha_shape, 5, 2)  # fmt: skip
    _raises(ValueError, r"alpha_shape: groups=8 must divide", jb.alpha_shape, 4, 8)
    _raises(TypeError, r"alpha_shape: groups must be an int >= 1; got True", jb.alpha_shape, 4,
            True)  # fmt: skip
    _raises(ValueError, r"alpha_shape: groups must be an int >= 1; got 0", jb.alpha_shape, 4, 0)
    _raises(TypeError, r"alpha_shape: num_features must be an int", jb.alpha_shape, 4.0)


def test_errors_name_function_argument_and_shapes():
    x = jnp.ones((8, 64))
    _raises(
        TypeError,
        r"batch_norm: x must be a floating-point array.*int32",
        jb.batch_norm,
        jnp.ones((8, 4), jnp.int32),
    )
    _raises(
        ValueError,
        r"batch_norm: scale must have shape \(64,\) .* got \(32,\)",
        jb.batch_norm,
        x,
        jnp.ones(32),
    )
    _raises(
        ValueError,
        r"batch_center: bias must have shape \(64,\)",
        jb.batch_center,
        x,
        jnp.ones((64, 1)),
    )
    _raises(
        ValueError,
        r"batch_inhib: alpha must have shape \(64, 64\) = .*|"
        r"batch_inhib: alpha must have shape \(64, 64\) for x with 64 features; got \(64, 32\)",
        jb.batch_inhib,
        x,
        jnp.ones((64, 32)),
    )
    _raises(
        ValueError,
        r"alpha must have shape \(4, 16, 16\) .*groups=4.*got \(64, 64\)",
        jb.batch_inhib,
        x,
        jnp.ones((64, 64)),
        groups=4,
    )
    _raises(
        ValueError,
        r"batch_inhib: groups=5 must divide the number of features N=64",
        jb.batch_inhib,
        x,
        jnp.ones((64, 64)),
        groups=5,
    )
    _raises(
        ValueError,
        r"batch_norm: axis 2 is out of range for x with 2 dimensions",
        jb.batch_norm,
        x,
        axis=2,
    )
    _raises(
        ValueError,
        r"batch_norm: mask must have the shape of x \(8, 64\).*got \(3,\)",
        jb.batch_norm,
        x,
        mask=jnp.ones(3, bool),
    )
    _raises(
        ValueError,
        r"dropout: rate must be a float in \[0, 1\]; got 1.5",
        jb.dropout,
        x,
        1.5,
        jax.random.key(0),
    )
    _raises(
        ValueError,
        r"dropout: rate must be a float in \[0, 1\]; got -0.1",
        jb.dropout,
        x,
        -0.1,
        jax.random.key(0),
    )
    _raises(
        ValueError,
        r"batch_norm: training-mode statistics need more than one value per "
        r"feature; got x of shape \(1, 64\)",
        jb.batch_norm,
        jnp.ones((1, 64)),
    )
    _raises(
        ValueError,
        r"batch_inhib: training-mode statistics need more than one value",
        jb.batch_inhib,
        jnp.ones((1, 4)),
        jnp.ones((4, 4)),
    )
    _raises(
        ValueError,
        r"batch_norm: .* got x of shape \(0, 4\), which has 0 values per feature",
        jb.batch_norm,
        jnp.ones((0, 4)),
    )
    _raises(
        TypeError,
        r"softmax_cross_entropy: labels must be probabilities.*one_hot",
        jb.softmax_cross_entropy,
        x,
        jnp.ones((8, 64), jnp.int32),
    )
    _raises(
        ValueError,
        r"batch_inhib: correlation must be one of",
        jb.batch_inhib,
        x,
        jnp.ones((64, 64)),
        correlation="std",
    )
    _raises(
        NameError,
        r"batch_norm: axis_name='batch' names no mapped axis",
        jb.batch_norm,
        x,
        axis_name="batch",
    )
    # errors happen at trace time, under jit too
    _raises(
        ValueError,
        r"batch_norm: scale must have shape \(64,\)",
        jax.jit(lambda x, s: jb.batch_norm(x, s)),
        x,
        jnp.ones(3),
    )


def test_inference_takes_the_training_covariance():
    """stats.cov of batch_inhib (shape (1, N, N) without groups) feeds the inference form
    and inhibition_matrix directly; a cov of the wrong size is refused by name."""
    x = _data((64, 5), jnp.float32)
    alpha = _alpha(5, 1, jnp.float32)
    y, st = jb.batch_inhib(x, alpha)
    y_inf = jb.batch_inhib_inference(x, alpha, st.cov)
    np.testing.assert_allclose(y_inf, y, rtol=1e-5, atol=1e-5)  # float32, same R
    # R by hand from its definition (docs/derivations.md): r the correlation, g the
    # softplus of alpha off the diagonal, R_ik = g_ik r_ik D_i / (D_i^2 + guard^2) with
    # D_i = sum_l g_il r_il (the absolute guard, 1e-3 by default)
    c = np.asarray(st.cov[0], np.float64)
    sd = np.sqrt(np.diag(c) + 1e-5)
    r = c / np.outer(sd, sd)
    g = np.log1p(np.exp(np.asarray(alpha, np.float64))) * (1 - np.eye(5))
    d = (g * r).sum(1, keepdims=True)
    want = g * r * d / (d**2 + 1e-3**2)
    for cov in (st.cov, st.cov[0]):  # (1, N, N) and (N, N) give the same (1, N, N) R
        # float32 against float64: measured 2e-7 relative
        np.testing.assert_allclose(jb.inhibition_matrix(cov, alpha)[0], want, rtol=2e-6, atol=1e-7)
    _raises(
        ValueError,
        r"inhibition_matrix: cov must have shape \(N, N\).*got \(5, 4\)",
        jb.inhibition_matrix,
        jnp.ones((5, 4)),
        alpha,
    )


def test_reference_takes_what_the_ops_take_and_agrees_on_an_empty_mask():
    """The reference is the ground truth, so it must accept what the op accepts and
    answer where the op does: batch_inhib_inference with the (1, N, N) covariance that
    batch_inhib returns (the reference's einsum refused it), and iter_norm / zca_norm
    with no valid row (the reference divided by a count of 0: all NaN; the ops floor it
    at 1, statistics 0). float64, rtol 1e-12."""
    with jax.enable_x64(True):
        x = _data((8, 4), jnp.float64, 21)
        s, b = _data((4,), jnp.float64, 22), _data((4,), jnp.float64, 23)
        alpha = _alpha(4, 1, jnp.float64)
        _, st = jb.batch_inhib(x, alpha)
        assert st.cov.shape == (1, 4, 4)
        np.testing.assert_allclose(
            ref.batch_inhib_inference(x, alpha, st.cov),
            jb.batch_inhib_inference(x, alpha, st.cov),
            rtol=1e-12,
        )
        none = jnp.zeros(8, bool)
        for name in ("iter_norm", "zca_norm"):
            got = getattr(jb, name)(x, s, b, mask=none)[0]
            want = getattr(ref, name)(x, s, b, mask=none)[0]
            assert np.all(np.isfinite(want)), name
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)
