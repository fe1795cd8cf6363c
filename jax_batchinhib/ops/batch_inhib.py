r"""BatchInhib: features inhibit each other through their batch correlation.

Derivation: docs/derivations.md, "3. batch_inhib".

Per group of ``n = N / groups`` contiguous features, with batch covariance ``C``:

.. math::
    r_{ik} = \frac{C_{ik}}{s_i s_k},\quad
    R_{ik} = \frac{g(\alpha_{ik})\, r_{ik}}{\sum_{l\ne i} g(\alpha_{il})\, q_{il}},\quad
    y_i = x_i - \sum_{l\ne i} R_{il}\, x_l,\quad g(a) = \mathrm{softplus}(\rho a)/\rho

with :math:`s_i = \sqrt{C_{ii}+\epsilon}` (Pearson, default) or :math:`s_i = C_{ii}+\epsilon`
(the original derivation's literal reading, ``correlation="variance"``), and :math:`q = r`
(signed denominator, the original one) or :math:`q = |r|` (``denominator="abs"``). The reciprocal of
the denominator :math:`D_i` is guarded as :math:`h(D) = D/(D^2+\delta^2)` (``guard`` =
δ): smooth, bounded by :math:`1/(2\delta)`, and :math:`1/D` to relative :math:`\delta^2/D^2`.
With ``guard_mode="relative"`` it is :math:`h(D) = D/(D^2+\delta^2 A_i^2)`,
:math:`A_i = \sum_{l\ne i} g(\alpha_{il})|r_{il}|`: scale-free, so that
:math:`\sum_k |R_{ik}| \le 1/(2\delta)` whatever the size of g (δ = 0.5 by default: ≤ 1).

The hand-derived backward (``docs/derivations.md``) is, in matrix form,

.. math::
    dX = dY - dY\,R + \mathrm{diag}(w)\,X_c\,(dC + dC^\top)/c,\qquad dR = -dY^\top X

with :math:`dC, d\alpha` from :math:`dR` through the chain R ← (P, h(D)) ← (G, r) ← C.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _ghost
from jax_batchinhib.ops import _stats as S

Array = jax.Array

CORRELATIONS = ("pearson", "variance")
DENOMINATORS = ("signed", "abs")
GUARD_MODES = ("absolute", "relative")
#: The guard δ used when ``guard=None``, per ``guard_mode``.
GUARD_DEFAULTS = {"absolute": 1e-3, "relative": 0.5}
#: τ: the floor of A in the relative guard, A² + τ², so that a row with no off-diagonal
#: weight (A = D = 0, e.g. a group of one feature) gets R = 0 instead of 0/0. Per dtype of
#: the computation (statistics are float32 or wider): the backward divides by
#: E = D² + δ²(A² + τ²) twice, which at A = D = 0 is δ²τ² (1e-12 in float64; in float32
#: τ = 1e-12 would make it 0 and 0/0 NaN, so 1e-8: δ²τ² = 4e-20 at δ = 0.02). It divides
#: by E twice rather than by E², which underflows float32 below δ ≈ 0.03.
RELATIVE_GUARD_FLOOR = {"float32": 1e-8, "float64": 1e-12}


def relative_guard_floor(dtype) -> float:
    """τ of the relative guard for a computation in ``dtype`` (float32 or float64)."""
    return RELATIVE_GUARD_FLOOR["float64" if jnp.dtype(dtype) == jnp.float64 else "float32"]


class InhibStats(NamedTuple):
    """Batch statistics of batch_inhib (stop-gradient).

    Attributes:
      mean: ``(N,)`` batch mean.
      var: ``(N,)`` biased batch variance.
      cov: ``(groups, N/groups, N/groups)`` biased batch covariance.
    """

    mean: Array
    var: Array
    cov: Array


@dataclasses.dataclass(frozen=True)
class InhibOptions:
    """BatchInhib's options, validated, with the guard default resolved.

    The one spelling of the options shared by :func:`batch_inhib`,
    :func:`batch_inhib_inference`, :func:`inhibition_matrix`, their references, the
    linen and NNX modules and :mod:`jax_batchinhib.fold`. Frozen and hashable (it is a
    static argument of the custom rules). ``guard=None`` becomes the guard mode's
    default (:data:`GUARD_DEFAULTS`). Construct it directly (errors name
    ``InhibOptions``) or with :meth:`checked` (errors name the caller).

    Attributes:
      rho, epsilon, groups, correlation, denominator, guard, guard_mode: as the
        arguments of :func:`batch_inhib` of the same names; ``guard`` is never None
        after construction.

    Example:
      >>> from jax_batchinhib.ops.batch_inhib import InhibOptions
      >>> InhibOptions(guard_mode="relative").guard
      0.5
    """

    rho: float = 1.0
    epsilon: float = 1e-5
    groups: int = 1
    correlation: str = "pearson"
    denominator: str = "signed"
    guard: float | None = None
    guard_mode: str = "absolute"

    def __post_init__(self):
        for k, v in _validate("InhibOptions", **self.kwargs()).items():
            object.__setattr__(self, k, v)

    @classmethod
    def checked(cls, fn: str, **options) -> InhibOptions:
        """Validate ``options`` with ``fn``'s name in the errors, then construct."""
        return cls(**_validate(fn, **options))

    def kwargs(self) -> dict:
        """The options as the ops' keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check_features(self, fn: str, n: int) -> None:
        """``groups`` must divide the number of features ``n``."""
        C.groups(fn, self.groups, n)


def _validate(
    fn,
    rho=1.0,
    epsilon=1e-5,
    groups=1,
    correlation="pearson",
    denominator="signed",
    guard=None,
    guard_mode="absolute",
) -> dict:
    """Every BatchInhib option through its validator; returns the resolved values."""
    guard_mode = C.choice(fn, "guard_mode", guard_mode, GUARD_MODES)
    return dict(
        rho=C.rho(fn, rho),
        epsilon=C.epsilon(fn, epsilon),
        groups=C.groups(fn, groups),
        correlation=C.choice(fn, "correlation", correlation, CORRELATIONS),
        denominator=C.choice(fn, "denominator", denominator, DENOMINATORS),
        guard=C.guard(fn, guard, GUARD_DEFAULTS[guard_mode]),
        guard_mode=guard_mode,
    )


# ------------------------------------------------------------------- R from covariance


def _g(alpha, rho):
    return jax.nn.softplus(rho * alpha) / rho


def _inhib_parts(cfg: InhibOptions, cov, alpha):
    """Everything R needs from the covariance ``cov`` (G, n, n) and ``alpha``."""
    n = cov.shape[-1]
    v = jnp.diagonal(cov, axis1=-2, axis2=-1)
    if cfg.correlation == "pearson":
        sd = jnp.sqrt(v + cfg.epsilon)
    else:
        sd = v + cfg.epsilon
    r = cov / (sd[..., :, None] * sd[..., None, :])
    off = 1.0 - jnp.eye(n, dtype=cov.dtype)
    gm = _g(alpha.astype(cov.dtype), cfg.rho) * off
    q = r if cfg.denominator == "signed" else jnp.abs(r)
    d = jnp.sum(gm * q, axis=-1)
    d2 = cfg.guard * cfg.guard
    if cfg.guard_mode == "absolute":  # h = D/(D² + δ²)
        a, s = None, d2
    else:  # h = D/(D² + δ²(A² + τ²)), A = Σ g|r|: scale-free, Σ_k |R_ik| <= 1/(2δ)
        a = jnp.sum(gm * jnp.abs(r), axis=-1)
        s = d2 * (a * a + relative_guard_floor(a.dtype) ** 2)
    h = d / (d * d + s)
    return sd, r, gm, d, h, a, s


def _matrix_of(parts):
    sd, r, gm, d, h, _, _ = parts
    return gm * r * h[..., None]


def _inhib_matrix(cfg: InhibOptions, cov, alpha):
    return _matrix_of(_inhib_parts(cfg, cov, alpha))


def _inhib_matrix_bwd(cfg: InhibOptions, alpha, parts, dR):
    """VJP of R(cov, alpha), given ``_inhib_parts(cfg, cov, alpha)``: returns
    (dcov, dalpha). Linear in dR."""
    sd, r, gm, d, h, a, s = parts
    p = gm * r
    q = r if cfg.denominator == "signed" else jnp.abs(r)
    dp = dR * h[..., None]
    dh = jnp.sum(dR * p, axis=-1)
    den = d * d + s  # s = δ² (absolute) or δ²(A² + τ²) (relative)
    # divided by den twice, not by den²: den² underflows float32 where den is
    # δ²τ² (a row with no off-diagonal weight, where dh is 0 and 0/0 would be NaN)
    dd = dh * (s - d * d) / den / den
    dgm = dp * r + dd[..., None] * q
    dq_g = dd[..., None] * gm
    # d|r|/dr: +1 at r = 0 (a constant feature's correlations), as JAX's derivative of
    # abs takes it, so the rule equals autodiff of the reference there too (any slope in
    # [-1, 1] is a subgradient at the kink; jnp.sign's 0 was another choice)
    if cfg.denominator != "signed" or a is not None:
        slope = jnp.where(r >= 0, 1.0, -1.0).astype(r.dtype)
    dr = dp * gm + (dq_g if cfg.denominator == "signed" else dq_g * slope)
    if a is not None:  # relative guard: h also depends on A = Σ g|r|, ∂h/∂A = -2δ²AD/E²
        da = -2.0 * cfg.guard * cfg.guard * a * d * dh / den / den
        dgm = dgm + da[..., None] * jnp.abs(r)
        dr = dr + da[..., None] * gm * slope
    af = alpha.astype(r.dtype)
    off = 1.0 - jnp.eye(r.shape[-1], dtype=r.dtype)
    dalpha = dgm * off * jax.nn.sigmoid(cfg.rho * af)
    drr = dr * r
    dsd = -(jnp.sum(drr, axis=-1) + jnp.sum(drr, axis=-2)) / sd
    dv = dsd / (2.0 * sd) if cfg.correlation == "pearson" else dsd
    dcov = dr / (sd[..., :, None] * sd[..., None, :])
    dcov = dcov + dv[..., :, None] * jnp.eye(r.shape[-1], dtype=r.dtype)
    return dcov, dalpha


# ------------------------------------------------------------------------- validation


def _check_batch_epsilon(fn, epsilon):
    """The training form divides by s = sqrt(var + epsilon) (pearson) or var + epsilon
    (variance): a constant feature of the batch (var = 0) with epsilon = 0 makes every
    output NaN, so epsilon must be > 0 there."""
    C.positive_epsilon(
        fn,
        epsilon,
        "it keeps the correlation's denominator, s = sqrt(var + epsilon) or var + epsilon, "
        "nonzero when a feature is constant over the batch",
    )


def _check_config(fn, rho, epsilon, groups, correlation, denominator, guard, guard_mode):
    return InhibOptions.checked(
        fn, rho=rho, epsilon=epsilon, groups=groups, correlation=correlation,
        denominator=denominator, guard=guard, guard_mode=guard_mode,
    )  # fmt: skip


def alpha_shape(num_features: int, groups: int = 1) -> tuple[int, ...]:
    """The shape alpha must have: (N, N), or (G, N/G, N/G) with groups=G > 1.

    Args:
      num_features: N, the number of features.
      groups: G, the number of contiguous feature groups; it must divide N.

    Returns:
      ``(N, N)`` for ``groups=1``, else ``(G, N/G, N/G)``.

    Example:
      >>> from jax_batchinhib import alpha_shape
      >>> alpha_shape(6), alpha_shape(6, groups=3)
      ((6, 6), (3, 2, 2))
    """
    nfeat = C.positive_int("alpha_shape", "num_features", num_features)
    groups = C.groups("alpha_shape", groups, nfeat)
    n = nfeat // groups
    return (n, n) if groups == 1 else (groups, n, n)


def _check_groups_alpha(fn, nfeat, groups, alpha, name="alpha"):
    C.groups(fn, groups, nfeat)
    S.check_float(fn, name, alpha)
    want = alpha_shape(nfeat, groups)
    got = tuple(jnp.shape(alpha))
    if name == "cov" and groups == 1 and got == (1, *want):
        return  # batch_inhib's own stats.cov: (1, N, N)
    if got != want:
        extra = f" (groups={groups})" if groups > 1 else ""
        raise ValueError(
            f"{fn}: {name} must have shape {S.shape_str(want)} for x with {nfeat} features"
            f"{extra}; got {S.shape_str(got)}"
        )


def _last(x, axes):
    """Where the feature axes go: the last ``len(axes)`` positions."""
    return tuple(range(x.ndim - len(axes), x.ndim))


def _as_matrix(x, axes):
    """x with the feature axes (a tuple) moved last and flattened to (M, N), N their
    product: several feature axes are flattened into one feature index."""
    xt = jnp.moveaxis(x, axes, _last(x, axes))
    n = math.prod(xt.shape[x.ndim - len(axes) :])
    return xt.reshape(-1, n), xt.shape


def _from_matrix(y2, tshape, axes):
    y = y2.reshape(tshape)
    return jnp.moveaxis(y, _last(y, axes), axes)


def _alpha3(alpha, groups):
    """(N, N) -> (1, N, N); grouped (G, n, n) as it is."""
    return alpha[None] if jnp.ndim(alpha) == 2 else alpha


# ========================================================================== batch_inhib


def batch_inhib(
    x,
    alpha,
    *,
    rho: float = 1.0,
    epsilon: float = 1e-5,
    axis: int = -1,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    groups: int = 1,
    correlation: str = "pearson",
    denominator: str = "signed",
    guard: float | None = None,
    guard_mode: str = "absolute",
    virtual_batch_size: int | None = None,
    use_fast_variance: bool = False,
):
    r"""BatchInhib with a hand-derived VJP for ``x`` and ``alpha``.

    Forward, per group: :math:`y = x - x R^\top`, with R from the batch correlation
    and ``alpha`` (the module docstring gives R in full). Backward:
    :math:`dX = dY - dY\,R + \mathrm{diag}(w)\,X_c\,(dC + dC^\top)/c`,
    :math:`dR = -dY^\top X`, and :math:`dC, d\alpha` from dR through the chain of
    docs/derivations.md, "3. batch_inhib". Statistics (mean, variance, covariance)
    reduce over every axis but ``axis`` (and across ``axis_name``), counting only rows
    where ``mask`` is True; every row is transformed. Cost O(m N²/groups) in matmuls;
    the backward keeps ``x`` and O(N²/groups) per-group matrices.

    Args:
      x: floating array ``(..., N)``.
      alpha: ``(N, N)``, or ``(groups, N/groups, N/groups)``; its diagonal takes no part.
      rho: sharpness of g(a) = softplus(rho a)/rho.
      epsilon: added to the variance in the correlation's denominator (> 0: a feature
        constant over the batch would otherwise make every output NaN).
      groups: split the N features into this many contiguous blocks, each inhibited
        only within itself.
      correlation: ``"pearson"`` (s = std) or ``"variance"`` (the original
        derivation's literal s = var, which makes r depend on the scale of x).
      denominator: ``"signed"`` (Σ g r, the original; can cross zero) or ``"abs"`` (Σ g |r|).
      guard: δ in the guarded reciprocal of the denominator D, which keeps y and its
        gradients finite when D crosses zero (uncorrelated or constant features);
        ``None``: 1e-3 (absolute) or 0.5 (relative: Σ_k |R_ik| <= 1).
      guard_mode: ``"absolute"``: h(D) = D/(D²+δ²), so Σ_k |R_ik| <= A_i/(2δ) with
        A_i = Σ_l g(α_il)|r_il| (large when g is); ``"relative"``: h(D) = D/(D²+δ²A_i²)
        (A_i² floored at τ²: τ = 1e-12 in float64, 1e-8 in float32), so
        Σ_k |R_ik| <= 1/(2δ) whatever the scale of g and r. R is then invariant to
        scaling g, so alpha's level no longer fades R out (the near-identity alpha init
        is not near identity in this mode).
      axis: the feature axis, or a tuple of feature axes: they are flattened (row-major,
        in increasing axis order) into N = the product of their sizes features, so
        alpha is (N, N) and the statistics have N entries.
      mask: row mask: x's shape without the feature axis, or a shape that broadcasts
        to x with feature dimensions of 1.
        Masked rows are selected away from the statistics (they may hold NaN or inf);
        they are still transformed, but pass no gradient (dx is 0 there).
      axis_name, axis_index_groups: sum the statistics across the devices of this mapped
        axis; see ``docs/scaling.md``.
      virtual_batch_size: ghost batches: each run of this many examples along the leading
        axis gets its own statistics (it must divide ``x.shape[0]``); the returned
        statistics are the mean over the sub-batches (with a mask, over those that hold
        a valid row: an empty sub-batch has no statistics).
      use_fast_variance: True: the covariance in one read of ``x``,
        ``Σ d dᵀ/n - mean_d mean_dᵀ`` with ``d = x - s`` (``s`` the first valid row); False
        (the default here, unlike batch_norm): the shifted two-pass
        ``Σ (d - mean_d)(d - mean_d)ᵀ/n`` (``docs/derivations.md``, "Numerics"). BatchInhib
        costs O(m N²/groups) in matmuls, so the extra O(m N) read saves nothing measurable,
        while the guarded reciprocal of the denominator amplifies the one-pass round-off
        (which grows with the distance of the shift from the mean, ``docs/derivations.md``,
        "Numerics") when D is near 0.

    Returns:
      ``(y, InhibStats(mean, var, cov))``; the statistics are wrapped in
      ``jax.lax.stop_gradient`` (they feed running averages, not the loss).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import batch_inhib
      >>> x = jax.random.normal(jax.random.key(0), (32, 4))
      >>> y, stats = jax.jit(batch_inhib)(x, jnp.zeros((4, 4)))  # one compile, not one per op
      >>> y.shape, stats.cov.shape
      ((32, 4), (1, 4, 4))
    """
    fn = "batch_inhib"
    S.check_float(fn, "x", x)
    red = S.make_reduce(fn, x, axis, axis_name, axis_index_groups)
    _check_batch_epsilon(fn, epsilon)
    cfg = _check_config(fn, rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    nfeat = math.prod(red.feature_shape(x.shape))  # several feature axes: flattened
    S.check_some_features(fn, x.shape, nfeat)
    S.check_features_unsharded(fn, x, red.axes)
    _check_groups_alpha(fn, nfeat, groups, alpha)
    fast = S.check_fast_variance(fn, use_fast_variance)
    if virtual_batch_size is not None:  # ghost batches: the op vmapped over sub-batches
        op = functools.partial(
            batch_inhib, alpha=alpha, axis=red.axis, axis_name=axis_name,
            axis_index_groups=axis_index_groups, use_fast_variance=fast,
            **cfg.kwargs(),
        )  # fmt: skip
        return _ghost.ghost_batches(
            fn, op, x, mask, virtual_batch_size, red.axis, axis_name, axis_index_groups
        )
    mask = S.mask_weights(fn, mask, x.shape, red, rows_only=True)
    S.static_count(fn, x.shape, red, mask)
    if mask is not None:
        mask = jnp.broadcast_to(
            mask, tuple(1 if a in red.axes else s for a, s in enumerate(x.shape))
        )
        mask = _as_matrix(mask, red.axes)[0]
    x2, tshape = _as_matrix(x, red.axes)
    mred = red.matrix()
    y2, stats = _batch_inhib(cfg, mred, fast, x2, _alpha3(alpha, groups), mask)
    stats = jax.tree.map(jax.lax.stop_gradient, stats)
    return _from_matrix(y2, tshape, red.axes), stats


def _group_major(x2, groups):
    """(M, N) -> (G, M, n): the group axis leads, so each group's rows are one contiguous
    matrix and every grouped product is a plain batched matmul (with the group axis in the
    middle XLA:CPU transposes the operands of each product; see benchmarks/notes.md)."""
    m, nf = x2.shape
    return jnp.transpose(x2.reshape(m, groups, nf // groups), (1, 0, 2))


def _feature_major(yg):
    """(G, M, n) -> (M, N), the inverse of :func:`_group_major`."""
    g, m, n = yg.shape
    return jnp.transpose(yg, (1, 0, 2)).reshape(m, g * n)


def _bi_center(cfg, red, x2, mask, fast):
    """Group-major (G, M, n) data, shift, mean of x - shift, var, covariance, count, over
    the rows where ``mask`` (M, 1) is True (masked rows are selected away, never weighted)."""
    cd = S.compute_dtype(x2.dtype)
    m, nf = x2.shape
    g = cfg.groups
    xf = x2.astype(cd)
    mask = S.mask_bool(mask)
    cnt = S.count(x2.shape, mask, red, cd)
    cnt = jnp.ravel(cnt)[0]  # rows are masked whole: one count for every feature
    nz = jnp.maximum(cnt, 1)
    if fast:  # one read: Σd and Σ d dᵀ of d = x - shift in the same pass
        s = S.shift_of(xf, mask, red)
        d = S.select(xf - s, mask)
        dg = _group_major(d, g)
        s1, s2 = red.psum(
            (jnp.sum(d, axis=0, keepdims=True),
             jnp.einsum("gmi,gmk->gik", dg, dg, precision=S.PRECISION, **S.row_sum_kw(dg, 1)))
        )  # fmt: skip
        mean_d = s1 / nz
        md = mean_d.reshape(g, nf // g)
        cov = s2 / nz - md[:, :, None] * md[:, None, :]
        dia = jnp.diagonal(cov, axis1=-2, axis2=-1)
        cov = cov + (jnp.maximum(dia, 0) - dia)[..., None] * jnp.eye(nf // g, dtype=cd)
        var = jnp.maximum(dia, 0).reshape(1, nf)
    else:  # shifted two-pass
        s, mean_d, var = S.moments(xf, mask, red, cnt, fast=False)
        xc = _group_major(S.select((xf - s) - mean_d, mask), g)
        cov = jnp.einsum("gmi,gmk->gik", xc, xc, precision=S.PRECISION, **S.row_sum_kw(xc, 1))
        cov = red.psum(cov) / nz
    return _group_major(xf, g), s, mean_d, var, cov, cnt


def _bi_forward(cfg, red, fast, x2, alpha3, mask):
    xg, s, mean_d, var, cov, cnt = _bi_center(cfg, red, x2, mask, fast)
    R = _inhib_matrix(cfg, cov, alpha3)

    def inhibit(xg, R):
        return xg - jnp.einsum("gml,gil->gmi", xg, R, precision=S.PRECISION)

    mg = None if mask is None else jnp.reshape(S.mask_bool(mask), (1, xg.shape[1], 1))
    yg = S.masked_outputs_constant(inhibit, mg, mg, xg, R)
    stats = InhibStats((s + mean_d)[0], var[0], cov)
    # y per member under vmap(axis_name=...) with x and alpha shared: Reduce.varying
    y = red.varying(_feature_major(yg).astype(x2.dtype))
    return y, stats, (s, mean_d, cov, cnt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _batch_inhib(cfg, red, fast, x2, alpha3, mask):
    y, stats, _ = _bi_forward(cfg, red, fast, x2, alpha3, mask)
    return y, stats


def _batch_inhib_fwd(cfg, red, fast, x2, alpha3, mask):
    y, stats, (s, mean_d, cov, cnt) = _bi_forward(cfg, red, fast, x2, alpha3, mask)
    # Residuals: x (input-sized, its own dtype), per-feature shift/mean, (G, n, n) cov.
    return (y, stats), (x2, alpha3, mask, s, mean_d, cov, cnt)


def _batch_inhib_bwd(cfg, red, fast, res, cts):
    x2, alpha3, mask, s, mean_d, cov, cnt = res
    dy2 = cts[0]  # statistics are stop-gradient in the public wrapper
    cd = cov.dtype
    m, nf = x2.shape
    g = cfg.groups
    mask = S.mask_bool(mask)
    # Masked rows are constants to differentiation: their cotangent is selected away, and
    # so is x there (garbage such as NaN must not reach dR = -dyᵀx: docs/derivations.md).
    xf = S.select(x2.astype(cd), mask, 0)
    xg = _group_major(xf, g)
    dyg = _group_major(S.select(dy2.astype(cd), mask), g)
    # Linear in dR: the local dalpha sums to the global one across devices; the x path
    # needs the global dcov.
    dx, dcov, dalpha = _linear_map_bwd(cfg, cov, alpha3, xg, dyg)
    dcov = red.psum(dcov)
    dcs = dcov + jnp.swapaxes(dcov, -1, -2)
    xc = _group_major(S.select((xf - s) - mean_d, mask), g)
    dx = dx + jnp.einsum("gmi,gik->gmk", xc, dcs, precision=S.PRECISION) / jnp.maximum(cnt, 1)
    dalpha = S.param_ct(dalpha.astype(alpha3.dtype), alpha3)  # docs/scaling.md
    return _feature_major(dx).astype(x2.dtype), dalpha, None


_batch_inhib.defvjp(_batch_inhib_fwd, _batch_inhib_bwd)


# ===================================================================== inference form


def batch_inhib_inference(
    x,
    alpha,
    cov,
    *,
    rho: float = 1.0,
    epsilon: float = 1e-5,
    axis: int = -1,
    groups: int = 1,
    correlation: str = "pearson",
    denominator: str = "signed",
    guard: float | None = None,
    guard_mode: str = "absolute",
):
    r"""BatchInhib with a given (running) covariance: the fixed linear map
    :math:`y = x (I - R^\top)`, R computed from ``cov`` as in :func:`batch_inhib`.

    Backward: :math:`dx = dy - dy R`, :math:`dR = -dy^\top x`, and ``dalpha``, ``dcov``
    from dR through the same chain as the training form.

    Args:
      x: floating array ``(..., N)``.
      alpha: the inhibition weights, shape ``alpha_shape(N, groups)``.
      cov: ``(N, N)`` or ``(groups, N/groups, N/groups)`` (e.g. a running covariance).
      axis: the feature axis.
      rho, epsilon, groups, correlation, denominator, guard, guard_mode: as in
        :func:`batch_inhib` (see :class:`InhibOptions`).

    Returns:
      ``y``, ``x``'s shape and dtype.
    """
    fn = "batch_inhib_inference"
    S.check_float(fn, "x", x)
    red = S.make_reduce(fn, x, axis)
    cfg = _check_config(fn, rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    nfeat = math.prod(red.feature_shape(x.shape))  # several feature axes: flattened
    S.check_some_features(fn, x.shape, nfeat)
    S.check_features_unsharded(fn, x, red.axes)
    _check_groups_alpha(fn, nfeat, groups, alpha)
    if cov is None:
        raise ValueError(f"{fn}: cov is required (the running covariance)")
    _check_groups_alpha(fn, nfeat, groups, cov, name="cov")
    x2, tshape = _as_matrix(x, red.axes)
    y2 = _bi_inf(cfg, x2, _alpha3(alpha, groups), _alpha3(cov, groups))
    return _from_matrix(y2, tshape, red.axes)


def _linear_map_bwd(cfg, cov, alpha3, xg, dyg):
    """Backward of y = x - x R(cov, alpha)^T for group-major (G, m, n) x and dy:
    dx = dy - dy R and dR = -dy^T x (this device's rows), then (dcov, dalpha) from dR.
    Returns (dx, dcov, dalpha); R's parts are computed once."""
    parts = _inhib_parts(cfg, cov, alpha3)
    R = _matrix_of(parts)
    dx = dyg - jnp.einsum("gmi,gil->gml", dyg, R, precision=S.PRECISION)
    dR = -jnp.einsum("gmi,gml->gil", dyg, xg, precision=S.PRECISION, **S.row_sum_kw(xg, 1))
    dcov, dalpha = _inhib_matrix_bwd(cfg, alpha3, parts, dR)
    return dx, dcov, dalpha


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bi_inf(cfg, x2, alpha3, cov3):
    cd = S.compute_dtype(jnp.result_type(x2.dtype, cov3.dtype))
    R = _inhib_matrix(cfg, cov3.astype(cd), alpha3)
    m, nf = x2.shape
    xg = _group_major(x2.astype(cd), cfg.groups)
    yg = xg - jnp.einsum("gml,gil->gmi", xg, R, precision=S.PRECISION)
    return _feature_major(yg).astype(x2.dtype)


def _bi_inf_fwd(cfg, x2, alpha3, cov3):
    return _bi_inf.fun(cfg, x2, alpha3, cov3), (x2, alpha3, cov3)  # .fun: see _bn_inf_fwd


def _bi_inf_bwd(cfg, res, dy2):
    x2, alpha3, cov3 = res
    cd = S.compute_dtype(jnp.result_type(x2.dtype, cov3.dtype))
    m, nf = x2.shape
    g = cfg.groups
    xg = _group_major(x2.astype(cd), g)
    dyg = _group_major(dy2.astype(cd), g)
    dx, dcov, dalpha = _linear_map_bwd(cfg, cov3.astype(cd), alpha3, xg, dyg)
    return (
        _feature_major(dx).astype(x2.dtype),
        S.param_ct(dalpha.astype(alpha3.dtype), alpha3),
        S.param_ct(dcov.astype(cov3.dtype), cov3),
    )


_bi_inf.defvjp(_bi_inf_fwd, _bi_inf_bwd)


def inhibition_matrix(
    cov,
    alpha,
    *,
    rho: float = 1.0,
    epsilon: float = 1e-5,
    groups: int = 1,
    correlation: str = "pearson",
    denominator: str = "signed",
    guard: float | None = None,
    guard_mode: str = "absolute",
):
    """The matrix R (groups, n, n) that batch_inhib applies as y = x - x Rᵀ, computed
    from a covariance (plain jnp, differentiable by autodiff). For plots, folding and
    eval-mode layers.

    Args:
      cov: ``(N, N)`` or ``(groups, N/groups, N/groups)``, a (running) covariance.
      alpha: the inhibition weights, shape ``alpha_shape(N, groups)``.
      rho, epsilon, groups, correlation, denominator, guard, guard_mode: as in
        :func:`batch_inhib` (see :class:`InhibOptions`).

    Returns:
      R of shape ``(groups, N/groups, N/groups)`` (``groups=1`` included), zero on the
      diagonal, in at least float32.
    """
    fn = "inhibition_matrix"
    cfg = _check_config(fn, rho, epsilon, groups, correlation, denominator, guard, guard_mode)
    S.check_float(fn, "cov", cov)
    cshape = tuple(jnp.shape(cov))
    if len(cshape) not in (2, 3) or cshape[-1] != cshape[-2]:
        raise ValueError(
            f"{fn}: cov must have shape (N, N) or (groups, N/groups, N/groups); got "
            f"{S.shape_str(cshape)}"
        )
    nfeat = cshape[-1] * (cshape[0] if len(cshape) == 3 else 1)
    if len(cshape) == 3 and cshape[0] == 1:
        nfeat = cshape[-1]
    _check_groups_alpha(fn, nfeat, groups, cov, name="cov")
    _check_groups_alpha(fn, nfeat, groups, alpha)
    cov3 = _alpha3(cov, groups)
    cd = S.compute_dtype(cov3.dtype)
    return _inhib_matrix(cfg, cov3.astype(cd), _alpha3(alpha, groups))
