r"""Batch whitening: IterNorm (Newton iterations) and ZCA (eigendecomposition).

Per group of ``n = N / groups`` contiguous features, over the ``c`` counted rows
(row weights :math:`w_j \in \{0, 1\}`), with :math:`X_c = X - \mathbf 1\mu^\top`:

.. math::
    \mu = X^\top w / c,\quad
    \Sigma = X_c^\top \mathrm{diag}(w) X_c / c + \epsilon I,\quad
    \hat x = X_c W,\quad y = \gamma \odot \hat x + \beta

with the whitening matrix :math:`W \approx \Sigma^{-1/2}`:

- ZCA (Huang et al., "Decorrelated Batch Normalization", CVPR 2018):
  :math:`\Sigma = U\,\mathrm{diag}(\lambda)\,U^\top`,
  :math:`W = U\,\mathrm{diag}(\lambda^{-1/2})\,U^\top`;
- IterNorm (Huang et al., "Iterative Normalization: Beyond Standardization towards
  Efficient Whitening", CVPR 2019): :math:`\Sigma_N = \Sigma/\mathrm{tr}\,\Sigma`,
  :math:`P_0 = I`, :math:`P_k = \tfrac12(3P_{k-1} - P_{k-1}^3\Sigma_N)`,
  :math:`W = P_T/\sqrt{\mathrm{tr}\,\Sigma}` (T = ``iterations`` Newton–Schulz steps).

The hand-derived backward (``docs/derivations.md``, "iter_norm and zca_norm"), with
:math:`d\hat x = \gamma \odot dy`, :math:`\bar W = X_c^\top d\hat x` (all rows) and
:math:`\bar\Sigma` the cotangent of Σ from :math:`\bar W` through the matrix function:

.. math::
    dX = d\hat x\,W^\top - \tfrac{w}{c}\,\mathbf 1^\top d\hat x\,W^\top
         + \mathrm{diag}(w)\,X_c\,(\bar\Sigma + \bar\Sigma^\top)/c

ZCA: :math:`\bar\Sigma = U (F \odot U^\top \bar W U) U^\top` with the Daleckii–Krein
divided differences of :math:`f(\lambda) = \lambda^{-1/2}`, written without a
difference of eigenvalues, :math:`F_{ik} = -1/(r_i r_k (r_i + r_k))`, :math:`r = \sqrt\lambda`:
finite and exact also for equal eigenvalues. IterNorm: the T iterations reversed, from the
kept :math:`P_1 \ldots P_T`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S

Array = jax.Array

METHODS = ("iter", "zca")
_NAMES = {"iter": "iter_norm", "zca": "zca_norm"}


class WhiteningStats(NamedTuple):
    """Batch statistics of iter_norm / zca_norm (stop-gradient, float32 or wider).

    Attributes:
      mean: ``(N,)`` batch mean.
      cov: ``(groups, N/groups, N/groups)`` biased batch covariance, without ε.
      whitening_matrix: W ``(groups, N/groups, N/groups)``, the matrix that was applied,
        :math:`\\hat x = (x - \\mu) W` (what a running whitening matrix averages).
    """

    mean: Array
    cov: Array
    whitening_matrix: Array


@dataclasses.dataclass(frozen=True)
class _Config:
    method: str  # "iter" or "zca"
    groups: int
    iterations: int  # IterNorm's T (ZCA: 0)
    epsilon: float


def _mT(a):
    return jnp.swapaxes(a, -1, -2)


def _mm(a, b):
    return jnp.matmul(a, b, precision=S.PRECISION)


# ------------------------------------------------------------------------- validation


def _one_axis(fn, axis, red):
    """The whitening ops take one feature axis (the modules say the same)."""
    if len(red.axes) > 1:
        raise TypeError(
            f"{fn}: axis must be an int (one feature axis: the features are whitened "
            f"together by an N x N matrix); got {axis!r}"
        )
    return red


def _check_iterations(fn, iterations):
    msg = f"{fn}: iterations must be a Python int >= 1 (the number of Newton steps); "
    if not C.is_int(iterations):
        raise TypeError(msg + f"got {iterations!r}")
    if iterations < 1:
        raise ValueError(msg + f"got {iterations!r}")


def _check_whitening_epsilon(fn, epsilon):
    C.positive_epsilon(
        fn,
        epsilon,
        "it makes the covariance positive definite, so that its inverse square root "
        "exists for any batch",
    )


def _check_matrix(fn, name, a, nfeat, groups):
    S.check_float(fn, name, a)
    n = nfeat // groups
    want = (groups, n, n)
    got = tuple(jnp.shape(a))
    if got == want or (groups == 1 and got == (n, n)):
        return
    alt = f" or {S.shape_str((n, n))}" if groups == 1 else ""
    raise ValueError(
        f"{fn}: {name} must have shape {S.shape_str(want)}{alt} for x with {nfeat} "
        f"features and groups={groups}; got {S.shape_str(got)}"
    )


def _as_matrix(x, axis):
    """x with the feature axis moved last and flattened to (M, N)."""
    xt = jnp.moveaxis(x, axis, -1)
    return xt.reshape(-1, xt.shape[-1]), xt.shape


def _from_matrix(y2, tshape, axis):
    return jnp.moveaxis(y2.reshape(tshape), -1, axis)


def _prepare(fn, method, x, scale, bias, groups, iterations, epsilon, axis, axis_name,
             axis_index_groups, mask):  # fmt: skip
    S.check_float(fn, "x", x)
    red = _one_axis(fn, axis, S.make_reduce(fn, x, axis, axis_name, axis_index_groups))
    nfeat = x.shape[red.axis]
    S.check_some_features(fn, x.shape, nfeat)
    S.check_features_unsharded(fn, x, (red.axis,))
    S.check_vector(fn, "scale", scale, nfeat)
    S.check_vector(fn, "bias", bias, nfeat)
    C.groups(fn, groups, nfeat)
    if method == "iter":
        _check_iterations(fn, iterations)
    _check_whitening_epsilon(fn, epsilon)
    mask = S.mask_weights(fn, mask, x.shape, red, rows_only=True)
    S.static_count(fn, x.shape, red, mask)
    if mask is not None:
        mask = jnp.broadcast_to(
            mask, tuple(1 if a == red.axis else s for a, s in enumerate(x.shape))
        )
        mask = _as_matrix(mask, red.axis)[0]  # (M, 1)
    cfg = _Config(method, groups, iterations if method == "iter" else 0, float(epsilon))
    return cfg, red, mask


# ================================================================ the public wrappers


def iter_norm(
    x,
    scale=None,
    bias=None,
    *,
    groups: int = 1,
    iterations: int = 5,
    epsilon: float = 1e-5,
    axis: int = -1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
):
    r"""IterNorm: batch whitening by T Newton–Schulz iterations, with a hand-derived VJP.

    Per group of ``N/groups`` contiguous features (Huang et al., CVPR 2019, Algorithm 1):

    .. math::
        \Sigma = X_c^\top X_c/c + \epsilon I,\quad \Sigma_N = \Sigma/\mathrm{tr}\,\Sigma,\quad
        P_0 = I,\quad P_k = \tfrac12(3P_{k-1} - P_{k-1}^3\Sigma_N),\quad
        W = P_T/\sqrt{\mathrm{tr}\,\Sigma},\quad y = \gamma\odot X_c W + \beta

    :math:`W\Sigma W \to I` as T grows (quadratically once every eigenvalue of
    :math:`P^2\Sigma_N` is near 1; slowly for eigenvalues of Σ far below its trace).

    Backward (``docs/derivations.md``, "iter_norm and zca_norm"): with
    :math:`\bar W = X_c^\top d\hat x`, :math:`\bar P_T = \bar W/\sqrt{t}` and, for
    k = T..1 (P = P_{k−1}),

    .. math::
        \bar P_{k-1} = \tfrac32\bar P_k - \tfrac12\big(\bar P_k (P^2\Sigma_N)^\top
          + P^\top\bar P_k(P\Sigma_N)^\top + (P^2)^\top\bar P_k\Sigma_N^\top\big),\quad
        \bar\Sigma_N \mathrel{-}= \tfrac12 (P^3)^\top\bar P_k

    evaluated per product of the forward (6 matmuls a step, autodiff's count), then
    :math:`\bar\Sigma = \bar\Sigma_N/t + \bar t I` and dx as in the module docstring.
    The backward keeps ``x``, :math:`P_1 \ldots P_T`, each step's P² and P³, and
    :math:`\Sigma_N`: x plus (3T+1)·G·n² numbers (autodiff keeps the same products and
    input-sized arrays).

    Args:
      x: floating array ``(..., N)``; float16/bfloat16 compute in float32.
      scale, bias: ``(N,)`` or None (then 1 and 0).
      groups: whiten each of this many contiguous blocks of N/groups features
        separately (must divide N).
      iterations: T, the number of Newton steps (a Python int >= 1).
      epsilon: added to the covariance's diagonal (> 0): a singular covariance (fewer
        rows than features, a constant feature) is whitened finitely.
      axis: the feature axis; statistics reduce over every other axis.
      axis_name, axis_index_groups: sum the statistics across the devices of this
        mapped axis (``shard_map``/``pmap``); see ``docs/scaling.md``.
      mask: row mask (x's shape without the feature axis, or a shape that broadcasts to
        x with a feature dimension of 1);
        masked rows are whitened but not counted in the statistics.

    Returns:
      ``(y, WhiteningStats(mean, cov, whitening_matrix))``; the statistics are under
      ``jax.lax.stop_gradient`` (they feed running averages, not the loss); gradients of
      ``y`` flow through the batch mean and covariance into ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import iter_norm
      >>> x = jax.random.normal(jax.random.key(0), (256, 4)) @ jnp.diag(jnp.arange(1.0, 5.0))
      >>> y, stats = iter_norm(x, iterations=7)
      >>> bool(jnp.allclose(jnp.cov(y.T, bias=True), jnp.eye(4), atol=1e-3))
      True
    """
    fn = "iter_norm"
    cfg, red, mask = _prepare(fn, "iter", x, scale, bias, groups, iterations, epsilon, axis,
                              axis_name, axis_index_groups, mask)  # fmt: skip
    return _run(cfg, red, x, scale, bias, mask)


def zca_norm(
    x,
    scale=None,
    bias=None,
    *,
    groups: int = 1,
    epsilon: float = 1e-5,
    axis: int = -1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
):
    r"""ZCA batch whitening (decorrelated batch norm) with a hand-derived VJP.

    Per group of ``N/groups`` contiguous features (Huang et al., CVPR 2018, its ZCA whitening):

    .. math::
        \Sigma = X_c^\top X_c/c + \epsilon I = U\,\mathrm{diag}(\lambda)\,U^\top,\quad
        W = U\,\mathrm{diag}(\lambda^{-1/2})\,U^\top,\quad y = \gamma\odot X_c W + \beta

    so that :math:`W\Sigma W = I` (the output covariance is :math:`I - \epsilon W^2`).

    Backward (``docs/derivations.md``, "iter_norm and zca_norm"): with
    :math:`\bar W = X_c^\top d\hat x` and :math:`r = \sqrt\lambda`,

    .. math::
        \bar\Sigma = U\big(F \odot U^\top\bar W U\big)U^\top,\qquad
        F_{ik} = \frac{\lambda_i^{-1/2} - \lambda_k^{-1/2}}{\lambda_i - \lambda_k}
               = -\frac{1}{r_i r_k (r_i + r_k)}

    (the Daleckii–Krein divided differences of :math:`\lambda^{-1/2}`; diagonal
    :math:`-\tfrac12\lambda^{-3/2}`). Written this way no eigenvalue difference is ever
    divided by, so the rule is exact and finite when eigenvalues coincide, where the
    eigenvectors' own derivative (the paper's :math:`1/(\lambda_i-\lambda_k)` matrix,
    and autodiff of ``eigh``) is infinite. The eigenvalues are floored at ε, which they
    equal or exceed in exact arithmetic. The backward keeps ``x``, Σ, U and λ.

    Second derivatives (grad of grad, Hessian-vector products, ``jax.hessian``) are
    finite and exact at repeated eigenvalues too, which a batch with fewer rows than
    features always has (λ = ε, n − m + 1 times): W and Σ̄ are custom-JVP functions of
    Σ, differentiated by the same divided differences and by the second divided
    difference of :math:`\lambda^{-1/2}`, never through ``eigh``'s derivative and its
    :math:`1/(\lambda_k - \lambda_i)`. For this the backward also keeps Σ (G n² more
    numbers). Third derivatives go through ``eigh``'s derivative: exact where the
    eigenvalues are distinct, NaN at a repeated one; IterNorm's are finite everywhere.

    Args:
      As :func:`iter_norm`, without ``iterations``.

    Returns:
      ``(y, WhiteningStats(mean, cov, whitening_matrix))``, statistics stop-gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import zca_norm
      >>> x = jax.random.normal(jax.random.key(0), (256, 4)) @ jnp.diag(jnp.arange(1.0, 5.0))
      >>> y, stats = zca_norm(x, epsilon=1e-6)
      >>> bool(jnp.allclose(jnp.cov(y.T, bias=True), jnp.eye(4), atol=1e-3))
      True
    """
    fn = "zca_norm"
    cfg, red, mask = _prepare(fn, "zca", x, scale, bias, groups, 1, epsilon, axis, axis_name,
                              axis_index_groups, mask)  # fmt: skip
    return _run(cfg, red, x, scale, bias, mask)


def _run(cfg, red, x, scale, bias, mask):
    x2, tshape = _as_matrix(x, red.axis)
    mred = red.matrix()
    y2, stats = _whiten(cfg, mred, x2, scale, bias, mask)
    stats = jax.tree.map(lax.stop_gradient, stats)
    return _from_matrix(y2, tshape, red.axis), stats


# ============================================================ the matrix functions


def _newton_forward(sigma, iterations):
    """IterNorm's W from Σ (G, n, n): returns W, the stacked P_1..P_T (T, G, n, n), the
    stacked products A = P² and B = P³ of each step's input P_0..P_{T-1} (T, G, n, n),
    Σ_N and t = tr Σ (G,). The backward needs exactly these: with A and B kept it
    costs the 6 products a step that autodiff's tape costs, not the 10 that recomputing
    them would."""
    t = jnp.trace(sigma, axis1=-2, axis2=-1)
    sn = sigma / t[:, None, None]
    eye = jnp.broadcast_to(jnp.eye(sigma.shape[-1], dtype=sigma.dtype), sigma.shape)

    def step(p, _):
        a = _mm(p, p)
        b = _mm(a, p)
        p = 1.5 * p - 0.5 * _mm(b, sn)
        return p, (p, a, b)

    pt, (ps, a_s, b_s) = lax.scan(step, eye, None, length=iterations)
    return pt / jnp.sqrt(t)[:, None, None], ps, a_s, b_s, sn, t


def _newton_backward(ps, a_s, b_s, sn, t, wbar):
    """Σ̄ from W̄ for IterNorm, reversing the T steps with the kept P_k, P_k², P_k³ (no
    tape): the adjoint of each of the forward's three products, in the forward's order."""
    eye = jnp.broadcast_to(jnp.eye(sn.shape[-1], dtype=sn.dtype), sn.shape)
    rt = jnp.sqrt(t)[:, None, None]
    pt = ps[-1]
    pbar = wbar / rt
    tbar = -0.5 * jnp.sum(wbar * pt, axis=(-2, -1)) / t / jnp.sqrt(t)  # W = P_T t^{-1/2}
    prev = jnp.concatenate([eye[None], ps[:-1]], axis=0)  # P_0 .. P_{T-1}

    def step(carry, pab):
        pb, snb = carry
        p, a, b = pab
        # P_k = 1.5 P - 0.5 C with A = P P, B = A P, C = B Σ_N
        cb = -0.5 * pb
        snb = snb + _mm(_mT(b), cb)
        bb = _mm(cb, _mT(sn))
        ab = _mm(bb, _mT(p))
        pb = 1.5 * pb + _mm(_mT(a), bb) + _mm(ab, _mT(p)) + _mm(_mT(p), ab)
        return (pb, snb), None

    (_, snb), _ = lax.scan(step, (pbar, jnp.zeros_like(sn)), (prev, a_s, b_s), reverse=True)
    # Σ_N = Σ / t and t = tr Σ
    tbar = tbar - jnp.sum(snb * sn, axis=(-2, -1)) / t
    return snb / t[:, None, None] + tbar[:, None, None] * eye


def _zca_forward(sigma, epsilon):
    """ZCA's W from Σ (G, n, n): returns W and the backward's residuals Σ, U and
    r = sqrt(λ) (λ floored at ε). W is :func:`_zca_w` of them, so that its first and
    second derivatives reach it through Σ, not through U (see there)."""
    lam, u = jnp.linalg.eigh(sigma)
    r = jnp.sqrt(jnp.maximum(lam, epsilon))
    return _zca_w(sigma, u, r), sigma, u, r


def _zca_matrix(u, r):
    return _mm(u / r[:, None, :], _mT(u))


def _in_eigenbasis(u, a):
    return _mm(_mm(_mT(u), a), u)


def _from_eigenbasis(u, a):
    return _mm(_mm(u, a), _mT(u))


# W = Σ^{-1/2} and its derivatives as functions of Σ. U and r are passed in (they are
# eigh(Σ), computed once), but each function's custom JVP differentiates through the
# tangent of Σ alone and ignores those of U and r: JAX's derivative of eigh divides by
# λ_k - λ_i and is NaN at a repeated eigenvalue, where W, its derivative and its second
# derivative are smooth (the divided differences below have limits there). Each JVP is
# the next function of the chain, so grad of grad (the backward differentiated) and
# forward-over-reverse stay exact at equal eigenvalues. A third derivative differentiates
# the rules' own computations (JAX keeps no custom rule in a linearised function) and so
# goes through U and r: exact for distinct eigenvalues, NaN at a repeated one, as
# autodiff of eigh is.


@jax.custom_jvp
def _zca_w(sigma, u, r):
    """W = U diag(1/r) Uᵀ = f(Σ), f(λ) = λ^{-1/2}."""
    del sigma
    return _zca_matrix(u, r)


@_zca_w.defjvp
def _zca_w_jvp(primals, tangents):
    sigma, u, r = primals
    return _zca_w(sigma, u, r), _zca_d1(sigma, u, r, tangents[0])


@jax.custom_jvp
def _zca_d1(sigma, u, r, h):
    """Df(Σ)[H] = U (F ⊙ UᵀHU) Uᵀ, F_ik = f[λ_i, λ_k] = -1/(r_i r_k (r_i + r_k)), the
    divided difference of f in a form with no eigenvalue difference. F is symmetric, so
    this is also the cotangent of Σ from a cotangent H of W (the backward's Σ̄)."""
    del sigma
    ri, rk = r[:, :, None], r[:, None, :]
    # divided in stages, not by the product r_i r_k (r_i + r_k): that overflows float32
    # once r reaches about 7e12 (features of that standard deviation), and F became -0
    return _from_eigenbasis(u, -(_in_eigenbasis(u, h) / ri / rk / (ri + rk)))


@_zca_d1.defjvp
def _zca_d1_jvp(primals, tangents):
    sigma, u, r, h = primals
    dsigma, _, _, dh = tangents
    out = _zca_d1(sigma, u, r, h)
    return out, _zca_d1(sigma, u, r, dh) + _zca_d2(sigma, u, r, dsigma, h)


def _zca_d2(sigma, u, r, e, h):
    """D²f(Σ)[E, H] = U (P(Ẽ, H̃) + P(H̃, Ẽ)) Uᵀ with Ẽ = UᵀEU, H̃ = UᵀHU and
    P(E, H)_ik = Σ_j f[λ_i, λ_j, λ_k] E_ij H_jk. The second divided difference,
    f[λ_i, λ_j, λ_k] = (r_i + r_j + r_k) / (r_i r_j r_k (r_i + r_j)(r_i + r_k)(r_j + r_k)),
    splits with A_ij = 1/(r_i + r_j) into two terms each of which is a matmul over j:
    P(E, H) = A ⊙ [(E D)(A ⊙ H)] / (r_i r_k) + A ⊙ [((A ⊙ E) D)(A ⊙ H)] / r_i,
    D = diag(1/r): O(n³) flops and O(n²) memory per group, no eigenvalue difference."""
    del sigma
    a = 1.0 / (r[:, :, None] + r[:, None, :])
    ri = 1.0 / r[:, :, None]  # 1/r_i down the rows
    rj = 1.0 / r[:, None, :]  # 1/r_j (or r_k) along the columns

    def p(e, h):
        ah = a * h
        return a * ri * (rj * _mm(e * rj, ah) + _mm(a * e * rj, ah))

    et, ht = _in_eigenbasis(u, e), _in_eigenbasis(u, h)
    return _from_eigenbasis(u, p(et, ht) + p(ht, et))


# ======================================================================= training op


def _center(cfg, red, x2, mb):
    """Float32-or-wider x, its shift/mean, the grouped centred data and the count
    (``mb``: the boolean row mask, or None)."""
    cd = S.compute_dtype(x2.dtype)
    m, nf = x2.shape
    g = cfg.groups
    xf = x2.astype(cd)
    cnt = S.count(x2.shape, mb, red, cd)
    s, mean_d, _ = S.moments(xf, mb, red, cnt)
    cnt = jnp.ravel(cnt)[0]  # rows are masked whole: one count for every feature
    xc = ((xf - s) - mean_d).reshape(m, g, nf // g)
    return xc, s, mean_d, cnt


def _rows(v, mb):
    """``v`` (M, G, n) with the masked rows selected to 0 (``mb``: (M, 1) bool or None)."""
    return v if mb is None else S.select(v, mb.reshape(v.shape[0], 1, 1))


def _affine(xh, scale, bias, cd):
    y = xh
    if scale is not None:
        y = y * scale.astype(cd)
    if bias is not None:
        y = y + bias.astype(cd)
    return y


def _wh_forward(cfg, red, x2, scale, bias, mask):
    mb = S.mask_bool(mask)
    xc, s, mean_d, cnt = _center(cfg, red, x2, mb)
    m, g, n = xc.shape
    # masked rows selected away, not weighted (NaN * 0 is NaN): docs/derivations.md
    wc = _rows(xc, mb)
    cov = red.psum(jnp.einsum("mgi,mgk->gik", wc, wc, precision=S.PRECISION, **S.row_sum_kw(wc, 0)))
    cov = cov / jnp.maximum(cnt, 1)
    sigma = cov + cfg.epsilon * jnp.eye(n, dtype=cov.dtype)
    if cfg.method == "iter":
        wmat, *mres = _newton_forward(sigma, cfg.iterations)
    else:
        wmat, *mres = _zca_forward(sigma, cfg.epsilon)

    def whiten(xc, wmat, scale, bias):
        xh = jnp.einsum("mgi,gik->mgk", xc, wmat, precision=S.PRECISION).reshape(m, g * n)
        return _affine(xh, scale, bias, xc.dtype)

    mx = None if mb is None else mb.reshape(m, 1, 1)
    y = S.masked_outputs_constant(whiten, mx, mb, xc, wmat, scale, bias)
    stats = WhiteningStats((s + mean_d)[0], cov, wmat)
    # y per member under vmap(axis_name=...) with x and the parameters shared
    return red.varying(y.astype(x2.dtype)), stats, (s, mean_d, cnt, tuple(mres))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _whiten(cfg, red, x2, scale, bias, mask):
    y, stats, _ = _wh_forward(cfg, red, x2, scale, bias, mask)
    return y, stats


def _whiten_fwd(cfg, red, x2, scale, bias, mask):
    y, stats, (s, mean_d, cnt, mres) = _wh_forward(cfg, red, x2, scale, bias, mask)
    # Residuals: x (input-sized, its own dtype), per-feature shift/mean, and what the
    # matrix function's reverse needs: ZCA Σ, U (G, n, n) and r (G, n) (Σ only carries
    # its tangent to second derivatives); IterNorm P_1..P_T
    # and each step's P², P³ (3 x (T, G, n, n)), Σ_N (G, n, n) and t (G,). W is
    # recomputed from them.
    return (y, stats), (x2, scale, bias, mask, s, mean_d, cnt, mres)


def _whiten_bwd(cfg, red, res, cts):
    x2, scale, bias, mask, s, mean_d, cnt, mres = res
    dy2 = cts[0]  # the statistics are stop-gradient in the public wrappers
    cd = s.dtype
    m, nf = x2.shape
    g = cfg.groups
    n = nf // g
    if cfg.method == "iter":
        ps, a_s, b_s, sn, t = mres
        wmat = ps[-1] / jnp.sqrt(t)[:, None, None]
    else:
        sigma, u, r = mres
        wmat = _zca_w(sigma, u, r)
    # Masked rows are constants to differentiation (as batch_norm's): their cotangent and
    # their data are selected away, so garbage there (NaN, inf) reaches no gradient.
    mb = S.mask_bool(mask)
    xc = _rows(((x2.astype(cd) - s) - mean_d).reshape(m, g, n), mb)
    dy = S.select(dy2.astype(cd), mb)
    dxh = dy if scale is None else dy * scale.astype(cd)
    dxh = dxh.reshape(m, g, n)
    # W̄ = X_cᵀ dx̂ over the valid rows, and the column sums of dx̂ for the mean's term:
    # both global sums across devices.
    wbar, colsum = red.psum(
        (
            jnp.einsum("mgi,mgk->gik", xc, dxh, precision=S.PRECISION, **S.row_sum_kw(xc, 0)),
            jnp.sum(dxh, axis=0),
        )
    )
    if cfg.method == "iter":
        sbar = _newton_backward(ps, a_s, b_s, sn, t, wbar)
    else:
        sbar = _zca_d1(sigma, u, r, wbar)
    w = 1.0 if mb is None else mb.astype(cd).reshape(m, 1, 1)
    wn = w / jnp.maximum(cnt, 1)
    dx = (
        jnp.einsum("mgk,gik->mgi", dxh, wmat, precision=S.PRECISION)
        - wn * jnp.einsum("gk,gik->gi", colsum, wmat, precision=S.PRECISION)
        + jnp.einsum("mgi,gik->mgk", xc, sbar + _mT(sbar), precision=S.PRECISION)
        / jnp.maximum(cnt, 1)
    )
    dscale = dbias = None
    if scale is not None:
        xh = jnp.einsum("mgi,gik->mgk", xc, wmat, precision=S.PRECISION).reshape(m, nf)
        dscale = S.param_ct(jnp.sum(dy * xh, axis=0).astype(scale.dtype), scale)
    if bias is not None:
        dbias = S.param_ct(jnp.sum(dy, axis=0).astype(bias.dtype), bias)
    return dx.reshape(m, nf).astype(x2.dtype), dscale, dbias, None


_whiten.defvjp(_whiten_fwd, _whiten_bwd)


# ===================================================================== inference forms


def iter_norm_inference(x, scale, bias, mean, whitening_matrix, *, groups: int = 1,
                        axis: int = -1):  # fmt: skip
    r"""IterNorm with a given (running) mean and whitening matrix: one matmul per group,
    :math:`y = \gamma\odot(x-\mu)W + \beta`.

    Backward: :math:`d\hat x = \gamma\odot dy`, :math:`dx = d\hat x\,W^\top`,
    :math:`d\mu = -\sum_j dx_j`, :math:`dW = (x-\mu)^\top d\hat x`,
    :math:`d\gamma = \sum dy\odot\hat x`, :math:`d\beta = \sum dy`.

    Args:
      x: floating array ``(..., N)``.
      scale, bias: ``(N,)`` or None.
      mean: ``(N,)`` (e.g. a running mean).
      whitening_matrix: ``(groups, N/groups, N/groups)``, or ``(N, N)`` with groups=1
        (e.g. a running average of ``stats.whitening_matrix``).
      groups, axis: as :func:`iter_norm`.

    Returns:
      ``y``, ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import iter_norm, iter_norm_inference
      >>> x = jax.random.normal(jax.random.key(0), (64, 4))
      >>> y, st = iter_norm(x)
      >>> yi = iter_norm_inference(x, None, None, st.mean, st.whitening_matrix)
      >>> bool(jnp.allclose(y, yi, atol=1e-5))
      True
    """
    return _inference("iter_norm_inference", x, scale, bias, mean, whitening_matrix, groups,
                      axis)  # fmt: skip


def zca_norm_inference(x, scale, bias, mean, whitening_matrix, *, groups: int = 1,
                       axis: int = -1):  # fmt: skip
    r"""ZCA whitening with a given (running) mean and whitening matrix:
    :math:`y = \gamma\odot(x-\mu)W + \beta`. The same map and backward as
    :func:`iter_norm_inference` (only the way W was obtained differs).

    Args:
      x, scale, bias, mean, whitening_matrix, groups, axis: as in
        :func:`iter_norm_inference`.

    Returns:
      ``y``, ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import zca_norm, zca_norm_inference
      >>> x = jax.random.normal(jax.random.key(0), (64, 4))
      >>> y, st = zca_norm(x)
      >>> yi = zca_norm_inference(x, None, None, st.mean, st.whitening_matrix)
      >>> bool(jnp.allclose(y, yi, atol=1e-5))
      True
    """
    return _inference("zca_norm_inference", x, scale, bias, mean, whitening_matrix, groups,
                      axis)  # fmt: skip


def _inference(fn, x, scale, bias, mean, wmat, groups, axis):
    S.check_float(fn, "x", x)
    red = _one_axis(fn, axis, S.make_reduce(fn, x, axis))
    nfeat = x.shape[red.axis]
    S.check_some_features(fn, x.shape, nfeat)
    S.check_features_unsharded(fn, x, (red.axis,))
    S.check_vector(fn, "scale", scale, nfeat)
    S.check_vector(fn, "bias", bias, nfeat)
    if mean is None or wmat is None:
        raise ValueError(f"{fn}: mean and whitening_matrix are required (running statistics)")
    S.check_vector(fn, "mean", mean, nfeat)
    C.groups(fn, groups, nfeat)
    _check_matrix(fn, "whitening_matrix", wmat, nfeat, groups)
    x2, tshape = _as_matrix(x, red.axis)
    y2 = _wh_inf(groups, x2, scale, bias, mean, wmat)
    return _from_matrix(y2, tshape, red.axis)


def _inf_parts(groups, x2, mean, wmat):
    cd = S.compute_dtype(jnp.result_type(x2.dtype, mean.dtype, wmat.dtype))
    m, nf = x2.shape
    w3 = wmat.astype(cd).reshape(groups, nf // groups, nf // groups)
    xc = (x2.astype(cd) - mean.astype(cd)).reshape(m, groups, nf // groups)
    return cd, w3, xc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wh_inf(groups, x2, scale, bias, mean, wmat):
    cd, w3, xc = _inf_parts(groups, x2, mean, wmat)
    xh = jnp.einsum("mgi,gik->mgk", xc, w3, precision=S.PRECISION).reshape(x2.shape)
    return _affine(xh, scale, bias, cd).astype(x2.dtype)


def _wh_inf_fwd(groups, x2, scale, bias, mean, wmat):
    # .fun, the undecorated function: forward-over-reverse (see batch_norm's _bn_inf_fwd)
    return _wh_inf.fun(groups, x2, scale, bias, mean, wmat), (x2, scale, bias, mean, wmat)


def _wh_inf_bwd(groups, res, dy2):
    x2, scale, bias, mean, wmat = res
    cd, w3, xc = _inf_parts(groups, x2, mean, wmat)
    m, nf = x2.shape
    dy = dy2.astype(cd)
    dxh = (dy if scale is None else dy * scale.astype(cd)).reshape(xc.shape)
    dx = jnp.einsum("mgk,gik->mgi", dxh, w3, precision=S.PRECISION).reshape(m, nf)
    dw = jnp.einsum("mgi,mgk->gik", xc, dxh, precision=S.PRECISION, **S.row_sum_kw(xc, 0))
    dscale = None
    if scale is not None:
        xh = jnp.einsum("mgi,gik->mgk", xc, w3, precision=S.PRECISION).reshape(m, nf)
        dscale = jnp.sum(dy * xh, axis=0).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(dy, axis=0).astype(bias.dtype)
    return (
        dx.astype(x2.dtype),
        S.param_ct(dscale, scale),
        S.param_ct(dbias, bias),
        S.param_ct((-jnp.sum(dx, axis=0)).astype(mean.dtype), mean),
        S.param_ct(dw.reshape(wmat.shape).astype(wmat.dtype), wmat),
    )


_wh_inf.defvjp(_wh_inf_fwd, _wh_inf_bwd)
