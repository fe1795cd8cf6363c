"""The two variance algorithms (``use_fast_variance``): the shifted one-pass
``Σd²/n - (Σd/n)²`` and the shifted two-pass ``Σ(d - mean_d)²/n``, ``d = x - s`` with
``s`` a (valid) sample of each feature (``docs/derivations.md``, "Numerics").

- both are within 1e-3 pointwise of float64 on float32 data with mean 1e4 and std 1e-2
  (batch_norm's y, with and without a mask, ghost batches; batch_inhib's covariance),
  where flax's unshifted one-pass is off by a large factor (tests/test_ops.py
  ``test_variance_survives_large_mean`` keeps that comparison);
- the one-pass error follows the derived bound ``~ u (1 + (mu - s)²/sigma²)``: an outlier
  as the shift degrades it, as the bound says, and the two-pass does not degrade;
- both backward rules equal autodiff of the reference computing the same algorithm, in
  float32 and float64;
- the one-pass backward (its shifted sum(dy * xhat)) stays within the same bound;
- the shift's search for the first valid row runs on a row mask's own shape.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp

FAST = [True, False]
IDS = ["one_pass", "two_pass"]


def large_mean(shape, seed=0):
    x = 1e4 + 1e-2 * jax.random.normal(jax.random.key(seed), shape)
    return x.astype(jnp.float32)


@pytest.mark.parametrize("fast", FAST, ids=IDS)
def test_large_mean_batch_norm_masked_and_ghost(fast):
    """y within 1e-3 of float64 with a mask (NaN at the masked rows) and with ghost
    batches, for both algorithms (measured 4e-7 one-pass, 3e-7 two-pass)."""
    x = large_mean((512, 4))
    mask = np.array(jax.random.bernoulli(jax.random.key(1), 0.7, (512,)))
    mask[0] = False  # the shift must be a valid sample, not row 0
    xbad = jnp.where(mask[:, None], x, jnp.nan)
    x64 = np.asarray(x, np.float64)
    f = jax.jit(lambda x, m: jb.batch_norm(x, mask=m, use_fast_variance=fast))
    y, st = f(xbad, jnp.asarray(mask))
    v = x64[mask]
    want = (v - v.mean(0)) / np.sqrt(v.var(0) + 1e-5)
    assert np.max(np.abs(np.asarray(y, np.float64)[mask] - want)) < 1e-3
    np.testing.assert_allclose(st.var, v.var(0), rtol=1e-5)  # measured 3e-7

    g = jax.jit(lambda x: jb.batch_norm(x, virtual_batch_size=128, use_fast_variance=fast))
    y, _ = g(x)
    xs = x64.reshape(4, 128, 4)
    want = (xs - xs.mean(1, keepdims=True)) / np.sqrt(xs.var(1, keepdims=True) + 1e-5)
    assert np.max(np.abs(np.asarray(y, np.float64) - want.reshape(512, 4))) < 1e-3


def test_the_shift_searches_a_row_mask_over_its_rows():
    """The first valid row is found on the mask's own shape: with a row mask of (512,)
    the search (an argmax) runs over 512 values, not over the mask broadcast to x's
    (512, 64). (The broadcast one was 64x the work, and XLA spent 20 s constant-folding
    it at (1024, 512) when the mask was a constant of the jitted function.) An element
    mask is searched whole."""
    x = large_mean((512, 64))
    rows = jnp.arange(512) > 3

    def argmax_sizes(mask):
        def walk(jaxpr):  # the op's custom_vjp and pjit bodies are sub-jaxprs
            for e in jaxpr.eqns:
                if e.primitive.name == "argmax":
                    yield int(np.prod(e.invars[0].aval.shape))
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    yield from walk(sub)

        return list(walk(jax.make_jaxpr(lambda x, m: jb.batch_norm(x, mask=m))(x, mask).jaxpr))

    assert argmax_sizes(rows) == [512]
    assert argmax_sizes(jnp.broadcast_to(rows[:, None], x.shape)) == [512 * 64]


@pytest.mark.parametrize("fast", FAST, ids=IDS)
def test_large_mean_batch_inhib_covariance(fast):
    """batch_inhib's covariance at mean 1e4, std 1e-2 (correlated features) within 1e-3
    of float64, relative to the largest entry (measured 1e-6 both), and so are the
    correlations (y itself, x - x Rᵀ at x ~ 1e4, carries float32's ulp of 1e4, 1e-3)."""
    z = jax.random.normal(jax.random.key(2), (1024, 4))
    mix = jnp.array(
        [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.5], [0, 0, 0, 1]]
    )
    x = (1e4 + 1e-2 * (z @ mix)).astype(jnp.float32)
    alpha = jnp.zeros((4, 4))
    y, st = jax.jit(lambda x: jb.batch_inhib(x, alpha, use_fast_variance=fast))(x)
    x64 = np.asarray(x, np.float64)
    cov = np.cov(x64.T, bias=True)
    err = np.max(np.abs(np.asarray(st.cov[0], np.float64) - cov)) / np.max(np.abs(cov))
    assert err < 1e-3, err
    np.testing.assert_allclose(st.var, np.diag(cov), rtol=1e-5)  # measured 3e-7
    # the correlations R is built from: float32 round-off (measured 2e-7)
    r = np.asarray(st.cov[0], np.float64) / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    r64 = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.max(np.abs(r - r64)) < 1e-3


def test_outlier_shift_follows_the_bound():
    """The shift is the first sample. Put it k standard deviations away from the mean:
    the one-pass variance's relative error grows like u (1 + k²) (the derived bound,
    u = 2^-24), the two-pass does not. Measured: one-pass 1e-7 at k=0 to 4e-3 at
    k=1e3 ((1 + k²) u = 6e-2); two-pass below 3e-7 throughout."""
    u = 2.0**-24
    base = np.asarray(large_mean((4096, 1), seed=3), np.float64)
    for k in (0.0, 30.0, 1e3):
        x64 = base.copy()
        x64[0] = 1e4 + k * 1e-2
        x = jnp.asarray(x64, jnp.float32)
        x64 = np.asarray(x, np.float64)
        want = x64.var(0)
        bound = (1 + ((x64.mean(0) - x64[0]) ** 2) / want) * u
        for fast in FAST:
            _, st = jax.jit(lambda x, f=fast: jb.batch_norm(x, use_fast_variance=f))(x)
            rel = float(np.max(np.abs(np.asarray(st.var, np.float64) - want) / want))
            if fast:
                assert rel <= 20 * bound[0] + 1e-6, (k, rel, bound)
            else:  # 20 u as in test_backward_at_large_mean_follows_the_bound
                assert rel <= 20 * u, (k, rel)


def test_backward_at_large_mean_follows_the_bound():
    """batch_norm's gradients on float32 data with mean 1e4, std 1e-2, against float64 of
    the same data, with the shift (row 0) k = |mean - s| / std standard deviations from
    the mean (row 0 set 0 or 30 std of the other rows away: k = 0 and 27). The one-pass
    backward accumulates sum(dy * xhat) shifted, as inv * (sum(dy * d) - mean_d * sum(dy)),
    which adds round-off ~ u (1 + k) sum|dy| to dscale; dx carries the variance's
    u (1 + k²) through 1/std. Measured at k = 0 / 27: dscale 6e-10 / 7e-7 of sum|dy|,
    dx 1e-7 / 1.3e-5 of max|dx| (one-pass); two-pass 6e-9 / 1e-7 throughout. An unshifted
    sum(dy * x) - mean * sum(dy) would be off by u |mean| / std = 6e-2 (measured
    1.2e-2 to 5.5e-2 over the four features; asserted above 1e-3).

    The factor 20 u covers the pairwise sums' growth, gamma_n = ceil(log2 4096) u = 12 u,
    as in test_outlier_shift_follows_the_bound."""
    u = 2.0**-24
    base = np.asarray(large_mean((4096, 4), seed=3), np.float64)
    ct = np.asarray(jax.random.normal(jax.random.key(4), (4096, 4)), np.float64) + 0.5
    sc = np.array([1.0, 0.5, 2.0, 1.5])

    def want(x):  # the rule in float64
        inv = 1 / np.sqrt(x.var(0) + 1e-5)
        xh = (x - x.mean(0)) * inv
        dsc = (ct * xh).sum(0)
        return sc * inv * (ct - ct.mean(0) - xh * (ct * xh).mean(0)), dsc

    def loss(x, s, fast):
        y, _ = jb.batch_norm(x, s, jnp.zeros(4), use_fast_variance=fast)
        return jnp.sum(y * jnp.asarray(ct, jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for k in (0.0, 30.0):
        x64 = base.copy()
        x64[0] = 1e4 + k * 1e-2
        x = jnp.asarray(x64, jnp.float32)
        x64 = np.asarray(x, np.float64)
        dx64, dsc64 = want(x64)
        kk = float(np.max(np.abs(x64.mean(0) - x64[0]) / x64.std(0)))
        for fast in FAST:
            got = grad(x, jnp.asarray(sc, jnp.float32), fast)
            dx, dsc = (np.asarray(a, np.float64) for a in got)
            e_sc = float(np.max(np.abs(dsc - dsc64) / np.abs(ct).sum(0)))
            e_dx = float(np.max(np.abs(dx - dx64)) / np.max(np.abs(dx64)))
            if fast:
                assert e_sc <= 20 * u * (1 + kk), (k, e_sc)
                assert e_dx <= 20 * u * (1 + kk**2), (k, e_dx)
            else:
                assert e_sc <= 20 * u and e_dx <= 20 * u, (k, e_sc, e_dx)
        if k == 0.0:  # the unshifted sum the bound warns of: u |mean| / std ~ 6e-2
            xj, cj = x, jnp.asarray(ct, jnp.float32)
            un = jax.jit(lambda x, c: jnp.sum(c * x, 0) - jnp.mean(x, 0) * jnp.sum(c, 0))(xj, cj)
            inv64 = 1 / np.sqrt(x64.var(0) + 1e-5)
            e_un = np.abs(np.asarray(un, np.float64) * inv64 - dsc64) / np.abs(ct).sum(0)
            assert np.min(e_un) > 1e-3, e_un  # measured 1.2e-2 to 5.5e-2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fast", FAST, ids=IDS)
def test_vjp_matches_reference_both_algorithms(fast, dtype):
    """check_vjp of batch_norm (statistics cotangents included), batch_center and
    batch_inhib against autodiff of the reference computing the same algorithm, with
    and without a mask, off-centre data (mean 5)."""
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        x = (5.0 + jax.random.normal(jax.random.key(0), (12, 2, 4))).astype(dt)
        sc = (1 + 0.3 * jax.random.normal(jax.random.key(1), (4,))).astype(dt)
        b = (0.3 * jax.random.normal(jax.random.key(2), (4,))).astype(dt)
        a = (0.5 * jax.random.normal(jax.random.key(3), (2, 2, 2))).astype(dt)
        rows = jnp.asarray(np.arange(24).reshape(12, 2) % 3 != 0)
        for mask in (None, rows):
            check_vjp(jb.batch_norm, ref.batch_norm, x, sc, b, mask=mask, use_fast_variance=fast)
            # float32 alpha: the rule's dalpha is 3e-4 relative off float64 at this data
            # (autodiff of the reference: 4e-7), the same with either variance algorithm
            # and before them: a property of batch_inhib's alpha rule, not of the
            # statistics, so float32 checks x (and y) and float64 checks both.
            check_vjp(
                jb.batch_inhib, ref.batch_inhib, x, a, groups=2, mask=mask,
                use_fast_variance=fast, argnums=(0,) if dtype == "float32" else None,
            )  # fmt: skip
