"""The seed derivations (000-004, quoted in docs/derivations.md) checked against autodiff.

Each test implements one seed formula literally, next to the corrected formula of
docs/derivations.md, and compares both to ``jax.grad`` of a naive float64 forward pass on
small random data. The corrected formula must match to float64 round-off
(rtol=1e-10, atol=1e-12); the seed's must miss by more than 0.1 relative. Tests whose
names end in ``_is_correct`` check seed formulas that are right.

Self-contained on purpose: imports only jax, numpy and pytest, not the package. Each test
computes its arrays in one jitted float64 program (one compile instead of one per eager
op) and asserts on the results.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# float64 round-off on shapes this small: a correct rule agrees with autodiff far below this.
RTOL, ATOL = 1e-10, 1e-12
# A wrong rule misses autodiff by at least this, relative to the largest gradient entry
# (the wrong seed formulas miss by 0.14 to 9.5 on this data).
MIN_REL_ERROR = 0.1


def run(compute):
    """Evaluate ``compute()`` (no arguments, returns a dict of arrays) in float64.

    One jitted program per test, compiled without backend optimisation: these programs
    are tiny, so compiling is the whole cost.
    """
    with jax.enable_x64(True):
        compiled = jax.jit(compute).lower().compile({"xla_backend_optimization_level": 0})
        return jax.device_get(compiled())


def rel_error(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_matches(got, want):
    assert np.asarray(got).dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def assert_differs(got, want):
    err = rel_error(got, want)
    assert err > MIN_REL_ERROR, f"seed formula unexpectedly matches autodiff (rel error {err:.2e})"


def normal(seed, shape, scale=1.0, shift=0.0):
    """Fixed float64 test data (numpy: no PRNG program to compile)."""
    return scale * np.random.default_rng(seed).standard_normal(shape) + shift


def uniform(seed, shape):
    return np.random.default_rng(seed).uniform(size=shape)


# --------------------------------------------------------------------------------------
# Batch norm (seeds 002, 003, 004): x is (m, N), statistics over the m rows.

EPS = 0.3  # large enough that the sign of epsilon (seed 004 eq 12) shows


def bn_forward(x, gamma, beta, eps=EPS):
    mu = x.mean(0)
    var = ((x - mu) ** 2).mean(0)
    return gamma * (x - mu) / jnp.sqrt(var + eps) + beta


def bn_setup():
    m, n = 8, 5
    x = normal(0, (m, n), 2.0, 3.0)
    gamma, beta, dy = normal(1, (n,)), normal(2, (n,)), normal(3, (m, n))
    dx_true = jax.grad(lambda x: jnp.sum(dy * bn_forward(x, gamma, beta)))(x)
    mu, var = x.mean(0), x.var(0)
    xhat = (x - mu) / jnp.sqrt(var + EPS)
    return dict(
        m=m,
        x=x,
        gamma=gamma,
        beta=beta,
        dy=dy,
        dx_true=dx_true,
        mu=mu,
        var=var,
        xhat=xhat,
        dxhat=gamma * dy,
    )


def bn_paper_terms(s):
    """Seed 002 / 003 section 1: dl/dsigma^2 and dl/dmu (without the sigma^2 term)."""
    dvar = jnp.sum(s["dxhat"] * (s["x"] - s["mu"]) * -0.5 * (s["var"] + EPS) ** -1.5, 0)
    dmu = jnp.sum(s["dxhat"] * -1.0 / jnp.sqrt(s["var"] + EPS), 0)
    return dvar, dmu


def test_seed002_paper_rule_is_correct():
    def compute():
        s = bn_setup()
        m, x, mu, var, dxhat = s["m"], s["x"], s["mu"], s["var"], s["dxhat"]
        dvar, dmu = bn_paper_terms(s)
        # Seed 003 keeps dl/dsigma^2 * sum(-2(x - mu))/m in dl/dmu; it is zero.
        dmu_003 = dmu + dvar * jnp.sum(-2.0 * (x - mu), 0) / m
        base = dxhat / jnp.sqrt(var + EPS) + dvar * 2 * (x - mu) / m
        return dict(seed002=base + dmu / m, seed003=base + dmu_003 / m, true=s["dx_true"])

    out = run(compute)
    assert_matches(out["seed002"], out["true"])
    assert_matches(out["seed003"], out["true"])


def test_seed002_folded_inference_affine_map_is_correct():
    def compute():
        x, gamma, beta = normal(0, (8, 5)), normal(1, (5,)), normal(2, (5,))
        mean, var = normal(3, (5,)), jnp.exp(normal(4, (5,)))
        scale = gamma / jnp.sqrt(var + EPS)
        return dict(
            folded=scale * x + (beta - scale * mean),
            y=gamma * (x - mean) / jnp.sqrt(var + EPS) + beta,
        )

    out = run(compute)
    assert_matches(out["folded"], out["y"])


def test_seed003_simplified_form_is_correct():
    def compute():
        s = bn_setup()
        m, dxhat, xhat = s["m"], s["dxhat"], s["xhat"]
        dx = (m * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0)) / (
            m * jnp.sqrt(s["var"] + EPS)
        )
        return dict(dx=dx, true=s["dx_true"])

    out = run(compute)
    assert_matches(out["dx"], out["true"])


def test_seed003_dl_dmu_squared_typo():
    """Seed 003 writes dl/d(mu_B^2) in dl/dx_i; read literally it is (dl/dmu)/(2 mu)."""

    def compute():
        s = bn_setup()
        m, x, mu, var, dxhat = s["m"], s["x"], s["mu"], s["var"], s["dxhat"]
        dvar, dmu = bn_paper_terms(s)
        common = dxhat / jnp.sqrt(var + EPS) + dvar * 2 * (x - mu) / m
        return dict(corrected=common + dmu / m, seed=common + dmu / (2 * mu) / m, true=s["dx_true"])

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed003_zscore_notation_sigma_plus_eps_is_another_function():
    """Seed 003's notation list: xhat = (x - mu)/(sigma + eps). Its own backward rule
    (derived for sqrt(sigma^2 + eps)) is not the gradient of that forward."""

    def compute():
        s = bn_setup()
        m, dxhat, xhat = s["m"], s["dxhat"], s["xhat"]
        rule = (m * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0)) / (
            m * jnp.sqrt(s["var"] + EPS)
        )

        def notation_forward(x):
            mu = x.mean(0)
            return s["gamma"] * (x - mu) / (jnp.sqrt(((x - mu) ** 2).mean(0)) + EPS)

        dx_notation = jax.grad(lambda x: jnp.sum(s["dy"] * notation_forward(x)))(s["x"])
        return dict(rule=rule, true=s["dx_true"], notation=dx_notation)

    out = run(compute)
    assert_matches(out["rule"], out["true"])
    assert_differs(out["rule"], out["notation"])


def test_seed003_seed004_affine_uses_x_instead_of_xhat():
    """Seed 003 (notation) and seed 004 eq (4) write y = gamma x + beta; the gamma
    gradient they then give, sum(dy * xhat) (seed 004 eq 6), belongs to y = gamma xhat + beta."""

    def compute():
        s = bn_setup()
        x, dy, beta = s["x"], s["dy"], s["beta"]
        return dict(
            true=jax.grad(lambda g: jnp.sum(dy * bn_forward(x, g, beta)))(s["gamma"]),
            eq4=jax.grad(lambda g: jnp.sum(dy * (g * x + beta)))(s["gamma"]),
            rule=jnp.sum(dy * s["xhat"], 0),
        )

    out = run(compute)
    assert_matches(out["rule"], out["true"])
    assert_differs(out["rule"], out["eq4"])


def test_seed004_eq9_is_wrong():
    """Diagonal d xhat_n / d x_n of one feature column."""

    def compute():
        s = bn_setup()
        m, col = s["m"], s["x"][:, 0]
        mu, var = col.mean(), col.var()

        def xhat(col):
            c = col - col.mean()
            return c / jnp.sqrt(jnp.mean(c**2) + EPS)

        dvar_dx = 2 * (col - mu) / m
        corrected = (1 - 1 / m) / jnp.sqrt(var + EPS) - (col - mu) * 0.5 * (
            var + EPS
        ) ** -1.5 * dvar_dx
        seed = (1 - 1 / m) / jnp.sqrt(var + EPS) - dvar_dx * (1 + mu) / (2 * (var + EPS) ** -1.5)
        return dict(true=jnp.diag(jax.jacfwd(xhat)(col)), corrected=corrected, seed=seed)

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed004_eq10_sign_error():
    """d sigma^2 / d x_i: for n != i, d(mu - x_n)^2/dx_i = 2(mu - x_n)/m; seed 004 eq (10)
    writes 2(x_n - mu)/m, which makes the result 2(x_i - mu)(1 - 2/m)/m."""

    def compute():
        s = bn_setup()
        m, col = s["m"], s["x"][:, 0]
        mu = col.mean()
        others = jnp.sum(col - mu) - (col - mu)  # sum over n != i of (x_n - mu)
        own = 2 * (col - mu) * (1 - 1 / m) / m
        return dict(
            true=jax.grad(lambda c: jnp.mean((c - c.mean()) ** 2))(col),
            seed=2 * others / m / m + own,
            corrected=-2 * others / m / m + own,
            simple=2 * (col - mu) / m,
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_matches(out["simple"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed004_eq8_drops_cross_sample_terms():
    """Eq (8) chains dL/dy_n only through d xhat_n/d x_n, even with eq (9) corrected."""

    def compute():
        s = bn_setup()
        m, x, mu, var = s["m"], s["x"], s["mu"], s["var"]
        diag = (1 - 1 / m) / jnp.sqrt(var + EPS) - (x - mu) ** 2 / m * (var + EPS) ** -1.5
        return dict(seed=s["dy"] * s["gamma"] * diag, true=s["dx_true"])

    out = run(compute)
    assert_differs(out["seed"], out["true"])


def test_seed004_eq12_sign():
    def compute():
        s = bn_setup()
        m, x, mu, var, dxhat = s["m"], s["x"], s["mu"], s["var"], s["dxhat"]
        dvar, dmu = bn_paper_terms(s)
        rest = dvar * 2 * (x - mu) / m + dmu / m
        return dict(
            corrected=dxhat / jnp.sqrt(var + EPS) + rest,
            seed=dxhat / jnp.sqrt(var - EPS) + rest,
            true=s["dx_true"],
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_derived_batch_norm_masked_with_statistics_cotangents():
    """Section 1: masked rows are transformed but not counted; mean and var are outputs."""

    def compute():
        x, gamma, beta = normal(0, (8, 5), 2.0, 3.0), normal(1, (5,)), normal(2, (5,))
        dy, dmu, dvar = normal(3, (8, 5)), normal(4, (5,)), normal(5, (5,))
        w = np.array([1.0, 1, 0, 1, 1, 0, 1, 1])[:, None]
        n = w.sum()

        def loss(x, gamma, beta, shifted):
            if shifted:  # the op's shifted two-pass: s is a constant sample of each feature
                s = jax.lax.stop_gradient(x[0])
                mu_d = (w * (x - s)).sum(0) / n
                var = (w * (x - s - mu_d) ** 2).sum(0) / n
                mu = s + mu_d
            else:
                mu = (w * x).sum(0) / n
                var = (w * (x - mu) ** 2).sum(0) / n
            y = gamma * (x - mu) / jnp.sqrt(var + EPS) + beta
            return jnp.sum(dy * y) + jnp.sum(dmu * mu) + jnp.sum(dvar * var)

        mu = (w * x).sum(0) / n
        var = (w * (x - mu) ** 2).sum(0) / n
        inv = 1 / jnp.sqrt(var + EPS)
        xhat = (x - mu) * inv
        dxhat = gamma * dy
        s1, s2 = dxhat.sum(0), (dxhat * xhat).sum(0)
        rule_dx = inv * (dxhat - (w / n) * (s1 + xhat * s2)) + (w / n) * (dmu + 2 * (x - mu) * dvar)
        return dict(
            true=jax.grad(loss, (0, 1, 2))(x, gamma, beta, False),
            shifted=jax.grad(loss, (0, 1, 2))(x, gamma, beta, True),
            rule=(rule_dx, (dy * xhat).sum(0), dy.sum(0)),
        )

    out = run(compute)
    for got, shifted, want in zip(out["rule"], out["shifted"], out["true"], strict=True):
        assert_matches(got, want)
        assert_matches(shifted, want)


def test_derived_batch_norm_inference_grads():
    def compute():
        x, gamma, beta = normal(0, (8, 5)), normal(1, (5,)), normal(2, (5,))
        mean, var, dy = normal(3, (5,)), jnp.exp(normal(4, (5,))), normal(5, (8, 5))

        def loss(x, gamma, beta, mean, var):
            return jnp.sum(dy * (gamma * (x - mean) / jnp.sqrt(var + EPS) + beta))

        inv = 1 / jnp.sqrt(var + EPS)
        xhat = (x - mean) * inv
        rule = (
            gamma * dy * inv,
            (dy * xhat).sum(0),
            dy.sum(0),
            -(gamma * dy * inv).sum(0),
            -0.5 * (gamma * dy * (x - mean) * inv**3).sum(0),
        )
        return dict(true=jax.grad(loss, (0, 1, 2, 3, 4))(x, gamma, beta, mean, var), rule=rule)

    out = run(compute)
    for got, want in zip(out["rule"], out["true"], strict=True):
        assert_matches(got, want)


def test_derived_batch_center_masked():
    def compute():
        x, b, dy, dmu = normal(0, (8, 5)), normal(1, (5,)), normal(2, (8, 5)), normal(3, (5,))
        w = np.array([1.0, 0, 1, 1, 1, 0, 1, 1])[:, None]
        n = w.sum()

        def loss(x, b):
            mu = (w * x).sum(0) / n
            return jnp.sum(dy * (x - mu + b)) + jnp.sum(dmu * mu)

        dx, db = jax.grad(loss, (0, 1))(x, b)
        return dict(
            dx=dx, db=db, rule_dx=dy - (w / n) * dy.sum(0) + (w / n) * dmu, rule_db=dy.sum(0)
        )

    out = run(compute)
    assert_matches(out["rule_dx"], out["dx"])
    assert_matches(out["rule_db"], out["db"])


def test_derived_shifted_two_pass_variance_float32():
    """Section 1 numerics: float32 data with |mean| >> std (1e4 vs 1e-2, 1000 values)."""
    xs = (1e4 + 1e-2 * normal(0, (1000,))).astype(np.float32)
    exact = xs.astype(np.float64)  # the float32 data, exactly
    var_true, xhat_true = exact.var(), (exact - exact.mean()) / exact.std()

    def compute():
        x = jnp.asarray(xs)
        naive = jnp.mean(x * x) - jnp.mean(x) ** 2
        mu = jnp.mean(x)
        plain = jnp.mean((x - mu) ** 2)
        d = x - x[0]
        mu_d = jnp.mean(d)
        shifted = jnp.mean((d - mu_d) ** 2)
        return dict(
            naive=naive,
            plain=plain,
            shifted=shifted,
            xhat_plain=(x - mu) / jnp.sqrt(plain),
            xhat_shifted=(d - mu_d) / jnp.sqrt(shifted),
        )

    out = run(compute)
    assert out["shifted"].dtype == np.float32
    assert abs(out["naive"] - var_true) > 0.5 * var_true
    assert abs(out["plain"] - var_true) > 1e-3 * var_true
    assert np.max(np.abs(out["xhat_plain"] - xhat_true)) > 1e-2
    assert abs(out["shifted"] - var_true) < 1e-5 * var_true
    assert np.max(np.abs(out["xhat_shifted"] - xhat_true)) < 1e-5


# --------------------------------------------------------------------------------------
# Seed 001: BN gamma/beta, dropout, softmax and the two-branch block.


def test_seed001_bn_gamma_beta_grads_are_correct():
    def compute():
        s = bn_setup()
        dg, db = jax.grad(lambda g, b: jnp.sum(s["dy"] * bn_forward(s["x"], g, b)), (0, 1))(
            s["gamma"], s["beta"]
        )
        return dict(
            dg=dg, db=db, rule_dg=jnp.sum(s["dy"] * s["xhat"], 0), rule_db=jnp.sum(s["dy"], 0)
        )

    out = run(compute)
    assert_matches(out["rule_dg"], out["dg"])
    assert_matches(out["rule_db"], out["db"])


def test_seed001_dropout_grad_is_the_mask_and_rate_one_is_zero_not_nan():
    def compute():
        x, dy = normal(0, (8, 5)), normal(1, (8, 5))
        u = uniform(2, (8, 5))
        out = {}
        for p in (0.0, 0.3):
            mask = jnp.where(u >= p, 1.0 / (1.0 - p), 0.0)
            out[f"rule{p}"] = dy * mask
            out[f"true{p}"] = jax.grad(lambda x: jnp.sum(dy * x * mask))(x)  # noqa: B023
        # p = 1: the seed's piecewise M is 0 everywhere; vectorised keep/(1 - p) is 0 * inf.
        keep = jnp.asarray(u >= 1.0, dtype=jnp.float64)
        out["naive"] = keep / (1.0 - 1.0) * dy
        out["piecewise"] = jnp.where(u >= 1.0, 1.0, 0.0) * dy
        return out

    out = run(compute)
    for p in (0.0, 0.3):
        assert_matches(out[f"rule{p}"], out[f"true{p}"])
    assert np.all(np.isnan(out["naive"]))
    assert np.all(out["piecewise"] == 0.0)


def softmax(z):
    e = jnp.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_seed001_softmax_final_rule_is_correct():
    def compute():
        z, da = normal(0, (8, 5)), normal(1, (8, 5))
        a = softmax(z)
        return dict(
            true=jax.grad(lambda z: jnp.sum(da * softmax(z)))(z),
            rule=(da - jnp.sum(da * a, -1, keepdims=True)) * a,
        )

    out = run(compute)
    assert_matches(out["rule"], out["true"])


def test_seed001_softmax_column_line_is_garbled():
    """The column d a / d z_k is a_k (e_k - a). Seed 001 writes the vector
    [-a_1, ..., 1 - a_k, ..., -a_K] = e_k - a (missing the factor a_k)."""
    k = 2

    def compute():
        z = normal(0, (5,))
        a = softmax(z)
        e_k = jnp.zeros(5).at[k].set(1.0)
        return dict(
            jac=jax.jacfwd(softmax)(z),
            column=a[k] * (e_k - a),
            full=a[:, None] * (jnp.eye(5) - a[None, :]),
            seed=e_k - a,
        )

    out = run(compute)
    assert_matches(out["column"], out["jac"][:, k])
    assert_matches(out["full"], out["jac"])
    assert_differs(out["seed"], out["jac"][:, k])


def test_derived_softmax_cross_entropy_unnormalized_labels_and_large_logits():
    def ce(z, t):
        lse = z.max(-1) + jnp.log(jnp.sum(jnp.exp(z - z.max(-1, keepdims=True)), -1))
        return t.sum(-1) * lse - jnp.sum(t * z, -1)

    def compute():
        z, t, g = normal(0, (8, 5), 3.0), jnp.abs(normal(1, (8, 5))), normal(2, (8,))
        dz, dt = jax.grad(lambda z, t: jnp.sum(g * ce(z, t)), (0, 1))(z, t)
        a = softmax(z)
        big = jnp.array([[1000.0, -1000.0, 0.0]])
        onehot = jnp.array([[0.0, 1.0, 0.0]])
        return dict(
            dz=dz,
            dt=dt,
            rule_dz=g[:, None] * (t.sum(-1, keepdims=True) * a - t),
            rule_dt=-g[:, None] * jnp.log(a),
            big=ce(big, onehot),
            big_grad=jax.grad(lambda z: ce(z, onehot).sum())(big),
            naive=-jnp.sum(onehot * jnp.log(jnp.exp(big) / jnp.exp(big).sum(-1)), -1),
        )

    out = run(compute)
    assert_matches(out["rule_dz"], out["dz"])
    assert_matches(out["rule_dt"], out["dt"])
    assert np.isfinite(out["big"]).all() and np.isfinite(out["big_grad"]).all()
    assert not np.isfinite(out["naive"]).all()


def block_params(d, h, a, hb, k, m=6, p=0.25):
    keys = iter(range(100, 200))
    P = dict(
        t1a=normal(next(keys), (d, h)),
        b1a=normal(next(keys), (h,)),
        t2a=normal(next(keys), (h, a)),
        b2a=normal(next(keys), (a,)),
        t1b=normal(next(keys), (d, hb)),
        b1b=normal(next(keys), (hb,)),
        t2b=normal(next(keys), (hb + a, k)),
        b2b=normal(next(keys), (k,)),
    )
    x = normal(next(keys), (m, d))
    mask = np.where(uniform(next(keys), (m, h)) >= p, 1.0 / (1.0 - p), 0.0)
    labels = np.eye(k)[np.random.default_rng(next(keys)).integers(0, k, m)]
    return P, x, mask, labels


def block_head(P, x, labels, ya):
    """Branch B and the loss, given branch A's output y_A."""
    x1b = x @ P["t1b"]
    xbn = x1b - x1b.mean(0) + P["b1b"]
    zbn = jnp.concatenate([jax.nn.relu(xbn), ya], -1)
    x2b = zbn @ P["t2b"] + P["b2b"]
    loss = -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(x2b), -1))
    return loss, dict(xbn=xbn, zbn=zbn, x2b=x2b)


def block_forward(P, x, mask, labels):
    """Seed 001's block in row-vector (batch-major) convention; returns the mean CE."""
    pre1a = x @ P["t1a"] + P["b1a"]
    zdp = jnp.sin(pre1a) * mask
    ya = zdp @ P["t2a"] + P["b2a"]
    loss, t = block_head(P, x, labels, ya)
    return loss, dict(t, pre1a=pre1a, zdp=zdp, ya=ya)


def block_backward(P, x, mask, labels):
    """The hand-chained backward of docs/derivations.md, section 6."""
    _, t = block_forward(P, x, mask, labels)
    m, hb = x.shape[0], P["t1b"].shape[1]
    dx2b = (softmax(t["x2b"]) - labels) / m
    dzbn = dx2b @ P["t2b"].T
    drelu, dya = dzbn[:, :hb], dzbn[:, hb:]
    dxbn = drelu * (t["xbn"] > 0)
    dx1b = dxbn - dxbn.mean(0)
    dzdp = dya @ P["t2a"].T
    dpre1a = dzdp * mask * jnp.cos(t["pre1a"])
    grads = dict(
        t2b=t["zbn"].T @ dx2b,
        b2b=dx2b.sum(0),
        b1b=dxbn.sum(0),
        t1b=x.T @ dx1b,
        t2a=t["zdp"].T @ dya,
        b2a=dya.sum(0),
        t1a=x.T @ dpre1a,
        b1a=dpre1a.sum(0),
    )
    inter = dict(dx2b=dx2b, dya=dya, dxbn=dxbn, dx1b=dx1b, dzdp=dzdp, dpre1a=dpre1a)
    return grads, inter, t


@functools.cache
def block_all(**dims):
    """Hand backward, autodiff grads and intermediates of the block, in one jitted program."""

    def compute():
        P, x, mask, labels = block_params(**dims)
        grads, inter, t = block_backward(P, x, mask, labels)
        true = jax.grad(lambda P: block_forward(P, x, mask, labels)[0])(P)
        dzdp_true = jax.grad(lambda zdp: block_head(P, x, labels, zdp @ P["t2a"] + P["b2a"])[0])(
            t["zdp"]
        )
        dya_true = jax.grad(lambda ya: block_head(P, x, labels, ya)[0])(t["ya"])
        dx2b_true = jax.grad(lambda x2b: -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(x2b), -1)))(
            t["x2b"]
        )
        return dict(
            P=P,
            x=x,
            labels=labels,
            grads=grads,
            inter=inter,
            t=t,
            true=true,
            dzdp_true=dzdp_true,
            dya_true=dya_true,
            dx2b_true=dx2b_true,
            softmax_x2b=softmax(t["x2b"]),
        )

    return run(compute)


def test_seed001_block_backward_by_hand_matches_autodiff():
    out = block_all(d=4, h=3, a=2, hb=3, k=5)
    for name in out["P"]:
        assert_matches(out["grads"][name], out["true"][name])


def test_seed001_loss_grad_misses_batch_mean():
    """Seed 001: dL/dx_B = y_B - yhat_B; for the batch-mean loss it is (y_B - yhat_B)/m."""
    out = block_all(d=4, h=3, a=2, hb=3, k=5)
    assert_matches(out["inter"]["dx2b"], out["dx2b_true"])
    assert_differs(out["softmax_x2b"] - out["labels"], out["dx2b_true"])


def test_seed001_batch_center_one_minus_one_over_m():
    """dL/dx_1B = dL/dx_BN (1 - 1/m) is only the diagonal of the Jacobian of x - mean(x)."""
    m = 8

    def compute():
        x1b, dxbn = normal(0, (m, 5)), normal(1, (m, 5))
        return dict(
            true=jax.grad(lambda x: jnp.sum(dxbn * (x - x.mean(0))))(x1b),
            corrected=dxbn - dxbn.mean(0),
            seed=dxbn * (1 - 1 / m),
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed001_dz_dp_line():
    """dL/dz_DP = dL/dz_2A - theta_2A: a minus where a product with theta_2A^T belongs.
    With one unit per layer (h = a = 1) the seed's expression even has the right shape."""
    out = block_all(d=4, h=1, a=1, hb=3, k=5)
    dya, t2a = out["inter"]["dya"], out["P"]["t2a"]
    assert_matches(dya @ t2a.T, out["dzdp_true"])
    assert_differs(dya - t2a, out["dzdp_true"])


def test_seed001_theta2a_uses_layer_input():
    """dL/dtheta_2A = dL/dz_2A * z_2A uses the layer's output; it needs its input z_DP.
    h = a so that both products have theta_2A's shape."""
    out = block_all(d=4, h=3, a=3, hb=3, k=5)
    dya, t = out["inter"]["dya"], out["t"]
    assert_matches(t["zdp"].T @ dya, out["true"]["t2a"])
    assert_differs(t["ya"].T @ dya, out["true"]["t2a"])


def test_seed001_theta1a_uses_input_x():
    """dL/dtheta_1A = dL/dx_1A * x_1A uses the pre-activation; it needs the input x.
    d = h so that both products have theta_1A's shape."""
    out = block_all(d=3, h=3, a=2, hb=3, k=5)
    dpre1a = out["inter"]["dpre1a"]
    assert_matches(out["x"].T @ dpre1a, out["true"]["t1a"])
    assert_differs(out["t"]["pre1a"].T @ dpre1a, out["true"]["t1a"])


def test_seed001_theta1b_multiplies_eta_not_x():
    """dL/dtheta_1B = dL/dx_1B * eta: no scalar eta gives theta_1B's gradient, x^T dx_1B."""
    out = block_all(d=4, h=3, a=2, hb=3, k=5)
    dx1b = out["inter"]["dx1b"]
    assert_matches(out["x"].T @ dx1b, out["true"]["t1b"])
    assert dx1b.shape != out["true"]["t1b"].shape  # (m, hb) vs (d, hb)


def test_seed001_dz2a_has_no_label_term_for_branch_a():
    """Seed 001 adds (y - yhat_A) to dL/dz_2A; branch A has no loss of its own, so dL/dy_A
    is only the y_A slice of dx_2B theta_2B^T."""
    out = block_all(d=4, h=3, a=5, hb=3, k=5)
    dya = out["inter"]["dya"]
    labels_a = np.roll(out["labels"], 1, axis=0)  # any label for branch A
    assert_matches(dya, out["dya_true"])
    assert_differs((out["t"]["ya"] - labels_a) + dya, out["dya_true"])


# --------------------------------------------------------------------------------------
# Seed 000: BatchInhib. X is (m, n); alpha is (n, n); no mask unless given.

RHO, BI_EPS = 1.7, 0.05


def g_soft(a):
    return jax.nn.softplus(RHO * a) / RHO


def inhib_parts(X, alpha, *, w=None, norm="pearson", den="signed", guard=0.0, eps=BI_EPS, cov=None):
    """Naive forward of eqs (1.1)-(1.5) with the implemented options; returns Y and parts."""
    m, n = X.shape
    w = jnp.ones((m, 1)) if w is None else w
    c = w.sum()
    mu = (w * X).sum(0) / c
    Xc = X - mu
    C = Xc.T @ (w * Xc) / c if cov is None else cov
    v = jnp.diag(C)
    s = jnp.sqrt(v + eps) if norm == "pearson" else v + eps
    r = C / jnp.outer(s, s)
    G = g_soft(alpha) * (1 - jnp.eye(n))
    P = G * r
    q = r if den == "signed" else jnp.abs(r)
    D = (G * q).sum(1)
    h = 1 / D if guard == 0 else D / (D**2 + guard**2)
    R = h[:, None] * P
    Y = X - X @ R.T
    return Y, dict(w=w, c=c, mu=mu, Xc=Xc, C=C, v=v, s=s, r=r, G=G, P=P, q=q, D=D, h=h, R=R)


def inhib_backward(X, alpha, dY, **kw):
    """The derived backward of docs/derivations.md, section 3 (matmuls and elementwise)."""
    _, t = inhib_parts(X, alpha, **kw)
    guard, den, norm = kw.get("guard", 0.0), kw.get("den", "signed"), kw.get("norm", "pearson")
    n = X.shape[1]
    R, P, h, D, G, r, q, s = (t[k] for k in "R P h D G r q s".split())
    dR = -dY.T @ X
    dP = h[:, None] * dR
    dh = (dR * P).sum(1)
    dD = dh * (guard**2 - D**2) / (D**2 + guard**2) ** 2
    dG = dP * r + dD[:, None] * q
    dr = dP * G + dD[:, None] * G * (1.0 if den == "signed" else jnp.sign(r))
    dalpha = dG * (1 - jnp.eye(n)) * jax.nn.sigmoid(RHO * alpha)
    ds = -((dr * r).sum(1) + (dr * r).sum(0)) / s
    dv = ds / (2 * s) if norm == "pearson" else ds
    dC = dr / jnp.outer(s, s) + jnp.diag(dv)
    dX_direct = dY - dY @ R
    dX_stats = (t["w"] * t["Xc"]) @ (dC + dC.T) / t["c"]
    return dict(
        dX=dX_direct + dX_stats,
        dX_direct=dX_direct,
        dX_stats=dX_stats,
        dalpha=dalpha,
        dR=dR,
        dr=dr,
        dC=dC,
        ds=ds,
    )


def inhib_setup(m=8, n=5):
    # a shared component keeps the correlations, hence the denominators D_i, away from 0
    X = normal(10, (m, n)) + 0.8 * normal(11, (m, 1)) + 2.0
    return X, normal(12, (n, n)), normal(13, (m, n))


def inhib_loss(X, alpha, dY, **kw):
    return jnp.sum(dY * inhib_parts(X, alpha, **kw)[0])


@pytest.mark.parametrize(
    "norm,den,guard,masked",
    [
        ("pearson", "signed", 1e-3, True),
        ("variance", "abs", 0.0, False),
        ("pearson", "abs", 0.5, True),
        ("variance", "signed", 1e-3, False),
    ],
)
def test_derived_batch_inhib_backward_matches_autodiff(norm, den, guard, masked):
    def compute():
        X, alpha, dY = inhib_setup()
        w = jnp.array([1.0, 1, 0, 1, 1, 1, 0, 1])[:, None] if masked else None
        kw = dict(w=w, norm=norm, den=den, guard=guard)
        dX, dalpha = jax.grad(inhib_loss, (0, 1))(X, alpha, dY, **kw)
        got = inhib_backward(X, alpha, dY, **kw)
        return dict(dX=dX, dalpha=dalpha, rule_dX=got["dX"], rule_dalpha=got["dalpha"])

    out = run(compute)
    assert_matches(out["rule_dX"], out["dX"])
    assert_matches(out["rule_dalpha"], out["dalpha"])


def test_derived_batch_inhib_inference_form_and_groups():
    blocks = [slice(0, 3), slice(3, 6)]

    def compute():
        X, alpha, dY = inhib_setup(n=6)
        cov = jnp.cov(X.T, bias=True) + 0.1 * jnp.eye(6)
        dX, dalpha, dC = jax.grad(
            lambda X, a, C: inhib_loss(X, a, dY, cov=C, guard=1e-3), (0, 1, 2)
        )(X, alpha, cov)
        got = inhib_backward(X, alpha, dY, cov=cov, guard=1e-3)

        # groups=2: two independent blocks of 3 features; the backward is per block
        alphas = jnp.stack([alpha[b, b] for b in blocks])

        def grouped(X, alphas):
            return jnp.concatenate(
                [inhib_parts(X[:, b], alphas[i])[0] for i, b in enumerate(blocks)], -1
            )

        gX, galphas = jax.grad(lambda X, a: jnp.sum(dY * grouped(X, a)), (0, 1))(X, alphas)
        per_block = [inhib_backward(X[:, b], alphas[i], dY[:, b]) for i, b in enumerate(blocks)]
        return dict(
            dX=dX,
            dalpha=dalpha,
            dC=dC,
            rule_dX=got["dX_direct"],
            rule_dalpha=got["dalpha"],
            rule_dC=got["dC"],
            gX=gX,
            galphas=galphas,
            rule_gX=jnp.concatenate([p["dX"] for p in per_block], -1),
            rule_galphas=jnp.stack([p["dalpha"] for p in per_block]),
        )

    out = run(compute)
    for name in ("dX", "dalpha", "dC", "gX", "galphas"):
        assert_matches(out["rule_" + name], out[name])


def test_seed000_eq1_6_dR_is_correct():
    def compute():
        X, alpha, dY = inhib_setup()
        R = inhib_parts(X, alpha)[1]["R"]
        return dict(true=jax.grad(lambda R: jnp.sum(dY * (X - X @ R.T)))(R), rule=-dY.T @ X)

    out = run(compute)
    assert_matches(out["rule"], out["true"])


def test_seed000_eq1_2_variance_reading_is_scale_dependent():
    """(1.2) defines sigma as the variance and (1.3) divides by sigma_i sigma_k:
    r(a x) = r(x)/a^2 and r_ii = 1/var_i. Dividing by std gives Pearson r, scale-free."""
    a = 3.0

    def compute():
        X, alpha, _ = inhib_setup()

        def r(X, norm):
            return inhib_parts(X, alpha, norm=norm, eps=0.0)[1]["r"]

        return dict(
            var=r(X, "variance"),
            var_scaled=r(a * X, "variance"),
            pearson=r(X, "pearson"),
            pearson_scaled=r(a * X, "pearson"),
        )

    out = run(compute)
    assert_matches(out["var_scaled"] * a**2, out["var"])
    assert_differs(out["var_scaled"], out["var"])
    assert_matches(out["pearson_scaled"], out["pearson"])
    assert_matches(np.diag(out["pearson"]), np.ones(5))
    assert np.max(np.abs(out["pearson"])) <= 1 + 1e-12


def test_seed000_eq1_7_alpha_grad_misses_denominator_terms():
    """(1.7) keeps only l = k of d R_il / d alpha_ik; D_i depends on alpha_ik, so every R_il
    of row i moves: dL/dalpha_ik = g'(alpha_ik) r_ik (dL/dR_ik - sum_l dL/dR_il R_il)/D_i."""

    def compute():
        X, alpha, dY = inhib_setup()
        _, t = inhib_parts(X, alpha)
        r, G, D, R = t["r"], t["G"], t["D"][:, None], t["R"]
        dR = -dY.T @ X
        gp = jax.nn.sigmoid(RHO * alpha) * (1 - jnp.eye(5))
        return dict(
            true=jax.grad(inhib_loss, 1)(X, alpha, dY),
            corrected=gp * r * (dR - (dR * R).sum(1, keepdims=True)) / D,
            seed=dR * r * (D - G * r) / D**2 * gp,
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed000_eq1_8_r_grad_drops_upstream_and_cross_terms():
    """(1.8) gives d R_ik/d r_ik for dL/dr_ik: no dL/dR factor and no l != k terms.
    Correct (signed, h = 1/D): dL/dr_ik = G_ik (dL/dR_ik - sum_l dL/dR_il R_il)/D_i."""

    def compute():
        X, alpha, dY = inhib_setup()
        _, t = inhib_parts(X, alpha)
        r, G, D, R = t["r"], t["G"], t["D"][:, None], t["R"]
        dR = -dY.T @ X

        def from_r(r):
            P = G * r
            return jnp.sum(dY * (X - X @ (P / P.sum(1, keepdims=True)).T))

        seed = G * (D - G * r) / D**2
        return dict(
            true=jax.grad(from_r)(r),
            rule=inhib_backward(X, alpha, dY)["dr"],
            corrected=G * (dR - (dR * R).sum(1, keepdims=True)) / D,
            seed=seed,
            seed_times_dR=dR * seed,
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_matches(out["rule"], out["true"])
    assert_differs(out["seed"], out["true"])
    assert_differs(out["seed_times_dR"], out["true"])  # even with the dL/dR_ik factor restored


def test_seed000_eq1_9_sigma_grad_misses_column_path():
    """(1.9) chains sigma_i through r_ik for one k, and drops dL/dr_ik. sigma_i enters
    r_ik and r_ki for every k: dL/ds_i = -(sum_k dr_ik r_ik + sum_k dr_ki r_ki)/s_i."""

    def compute():
        X, alpha, dY = inhib_setup()
        _, t = inhib_parts(X, alpha, norm="variance", eps=0.0)
        C, G, s = t["C"], t["G"], t["s"]
        dr = inhib_backward(X, alpha, dY, norm="variance", eps=0.0)["dr"]

        def from_s(s):
            P = G * C / jnp.outer(s, s)
            return jnp.sum(dY * (X - X @ (P / P.sum(1, keepdims=True)).T))

        r = C / jnp.outer(s, s)
        k = (jnp.arange(5) + 1) % 5  # one k per i, as the seed writes it
        return dict(
            true=jax.grad(from_s)(s),
            corrected=-((dr * r).sum(1) + (dr * r).sum(0)) / s,
            seed=-C[jnp.arange(5), k] / (s**2 * s[k]),
            seed_row_sum=-(dr * r).sum(1) / s,  # summed over k, dL/dr_ik restored
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])
    assert_differs(out["seed_row_sum"], out["true"])


def test_seed000_eq1_10_mean_path_is_zero():
    """Both terms of (1.10) carry sum_j (x^(j) - mu) = 0, so dL/dmu = 0: the mean path
    contributes nothing (the seed's -1/(2m) coefficient for d sigma/d mu is moot)."""

    def compute():
        X, alpha, dY = inhib_setup()

        def with_mu(mu):
            Xc = X - mu
            return inhib_loss(X, alpha, dY, cov=Xc.T @ Xc / X.shape[0])

        return dict(dmu=jax.grad(with_mu)(X.mean(0)))

    out = run(compute)
    assert np.max(np.abs(out["dmu"])) < 1e-11


def test_seed000_eq1_11_misses_other_outputs_path():
    """(1.11) takes dL/dy_i^(j) * 1 as the direct term; x_i also enters every other output
    y_l through -R_li x_i, which adds -(dY R)."""

    def compute():
        X, alpha, dY = inhib_setup()
        got = inhib_backward(X, alpha, dY)
        return dict(
            true=jax.grad(inhib_loss)(X, alpha, dY), corrected=got["dX"], seed=dY + got["dX_stats"]
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])


def test_seed000_eq1_11_single_k_misses_r_ki_path():
    """(1.11)'s correlation term, summed over k, is X_c dC^T/m: it misses the r_ki path
    (C is symmetric, so x_i^(j) enters C_ik and C_ki): correct is X_c (dC + dC^T)/m."""

    def compute():
        X, alpha, dY = inhib_setup()
        m = X.shape[0]
        got = inhib_backward(X, alpha, dY)
        Xc, dC = inhib_parts(X, alpha)[1]["Xc"], got["dC"]
        return dict(
            true=jax.grad(inhib_loss)(X, alpha, dY),
            corrected=got["dX_direct"] + Xc @ (dC + dC.T) / m,
            seed=got["dX_direct"] + Xc @ dC.T / m,
        )

    out = run(compute)
    assert_matches(out["corrected"], out["true"])
    assert_differs(out["seed"], out["true"])
