r"""Fold eval-mode layers into the neighbouring Dense or Conv for inference.

In eval mode every layer of ours is a fixed affine (BatchNorm, BatchCenter) or linear
(BatchInhib) map of the features, so it merges into an adjacent linear layer, and the
model runs as plain :class:`flax.linen.Dense` / :class:`flax.linen.Conv` layers.

- BatchNorm after a layer with kernel K (``(..., in, out)``) and bias b
  (docs/derivations.md, "Inference form"):
  :math:`y = a\,x + c` with :math:`a = \gamma/\sqrt{Var+\epsilon}`,
  :math:`c = \beta - \gamma E[x]/\sqrt{Var+\epsilon}`, so
  :math:`K' = K\,\mathrm{diag}(a)`, :math:`b' = a\,b + c`.
- BatchCenter after a layer: :math:`b' = b - E[x] + \beta`.
- BatchInhib is :math:`y = x M` with :math:`M = I - R^\top` (block diagonal over the
  groups, R from the running covariance). After a layer: :math:`K' = K M`,
  :math:`b' = b M`. Before a layer: :math:`K'_{\dots i o} = \sum_j M_{ij} K_{\dots j o}`
  (exact for Conv with zero padding too: M maps a zero pixel to zero).
- IterNorm / ZCANorm (eval mode) is :math:`y = \gamma\odot(x-\mu)W + \beta` with W
  block diagonal over the groups (the running whitening matrix). After a layer:
  :math:`K' = K\,W\,\mathrm{diag}(\gamma)`,
  :math:`b' = ((b-\mu) W)\odot\gamma + \beta`.

A grouped or depthwise Conv (``feature_group_count`` G > 1, kernel ``(..., in/G, out)``)
connects each group of channels only to itself, so M or W folds into it exactly when it
does not mix the conv's groups: when the layer's ``groups`` is a multiple of G. The
kernel does not show G, so the BatchInhib and whitening folds take
``feature_group_count`` and refuse the other cases (folding after a grouped conv without
it would mix its groups silently). BatchNorm and BatchCenter are per feature and fold
into any Conv.

Every function takes the variables as stored by the modules (linen ``params`` /
``batch_stats`` sub-dicts, or NNX ``nnx.state`` values converted with
``.to_pure_dict()``; a layer with no parameters, ``use_scale=False, use_bias=False``,
passes ``None`` or ``{}``) and returns ``{"kernel": ..., "bias": ...}`` for a plain Dense
or Conv with ``use_bias=True``, computed in at least float32. A key that the layer does
not have (a BatchNorm's ``var`` given to :func:`fold_batch_center`, say) is an error, so
that another layer's variables are not folded as if they were this one's.

The folds after a layer take the normalization's statistics to be over the layer's
output features, its kernel's last axis: the module must normalize the last axis
(``axis=-1``, the default). The arrays do not show the axis, so a module on another axis
of the same size would fold into a wrong layer without an error.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jax_batchinhib import linen as bnn, fold
  >>> x = jax.random.normal(jax.random.key(0), (16, 3))
  >>> dense, bn = nn.Dense(4), bnn.BatchNorm(use_running_average=True)
  >>> dv = dense.init(jax.random.key(1), x)
  >>> bv = bn.init(jax.random.key(2), dense.apply(dv, x))
  >>> p = fold.fold_batch_norm(dv["params"], bv["params"], bv["batch_stats"], epsilon=bn.epsilon)
  >>> y = bn.apply(bv, dense.apply(dv, x))
  >>> bool(jnp.allclose(nn.Dense(4).apply({"params": p}, x), y, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.scipy.linalg import block_diag

from jax_batchinhib import _modules as M
from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S
from jax_batchinhib.ops import alpha_shape, inhibition_matrix
from jax_batchinhib.ops.batch_inhib import InhibOptions

__all__ = [
    "batch_norm_affine",
    "fold_batch_center",
    "fold_batch_inhib_after",
    "fold_batch_inhib_before",
    "fold_batch_norm",
    "fold_whitening_after",
    "inhib_map",
    "inhib_options",
]


def _dtype(*arrays):
    return S.compute_dtype(jnp.result_type(*arrays))


#: every variable (params and batch_stats) of each layer the folds take: a key outside
#: its set names another layer's variable
_VARIABLES = {
    "BatchNorm": ("scale", "bias", "mean", "var", "count"),
    "BatchCenter": ("bias", "mean", "count"),
    "BatchInhib": ("alpha", "mean", "var", "cov", "count"),
    "IterNorm or ZCANorm": ("scale", "bias", "mean", "whitening_matrix", "count"),
}


def _variables(fn, name, v, layer, optional=False):
    """``v`` checked to be a mapping (``None`` is ``{}`` when ``optional``: a layer
    without parameters) whose keys are all variables of ``layer``."""
    if v is None and optional:
        return {}
    if not isinstance(v, Mapping):
        none = " (or None when the layer has none)" if optional else ""
        raise TypeError(
            f"{fn}: {name} must be a mapping of arrays{none}: the {layer}'s variables as "
            f"the module stores them (a linen 'params' or 'batch_stats' sub-dict, or "
            f"nnx.state(module).to_pure_dict()); got {type(v).__name__}"
        )
    own = _VARIABLES[layer]
    foreign = sorted(str(k) for k in v if k not in own)
    if foreign:
        raise ValueError(
            f"{fn}: {name} holds {foreign}, which a {layer} does not have (another layer's "
            f"variables?); a {layer}'s variables are {list(own)}"
        )
    return v


def _float(fn, what, v):
    """``v`` as an array, refused unless floating-point (a complex scale's imaginary part
    would be dropped by the fold's cast)."""
    if v is None:
        raise TypeError(f"{fn}: {what} must be a floating-point array; got None")
    v = jnp.asarray(v)
    C.float_array(fn, what, v)
    return v


def _layer(fn, layer_params):
    """The layer's kernel (..., in, out) and bias (out,) or None, shapes checked."""
    if not isinstance(layer_params, Mapping):
        raise TypeError(
            f"{fn}: layer_params must be a mapping of arrays (a Dense or Conv's params: "
            f"{{'kernel': ..., 'bias': ...}}; for NNX, nnx.state(layer).to_pure_dict()); "
            f"got {type(layer_params).__name__}"
        )
    if "kernel" not in layer_params:
        raise ValueError(
            f"{fn}: layer_params must hold 'kernel' (a Dense or Conv's params); got keys "
            f"{sorted(layer_params)}"
        )
    k = _float(fn, "layer_params['kernel']", layer_params["kernel"])
    if k.ndim < 2:
        raise ValueError(
            f"{fn}: layer_params['kernel'] must have shape (..., in, out) (a Dense or Conv "
            f"kernel, at least 2 dimensions); got {S.shape_str(k.shape)}"
        )
    b = layer_params.get("bias")
    b = None if b is None else _float(fn, "layer_params['bias']", b)
    _check_n(fn, "layer_params['bias']", b, k.shape[-1])
    return k, b


def _check_n(fn, what, v, n, of="the layer's {n} output features"):
    if v is not None and jnp.shape(v) != (n,):
        raise ValueError(
            f"{fn}: {what} must have shape ({n},) to match {of.format(n=n)}; "
            f"got {S.shape_str(jnp.shape(v))}"
        )


def _stat(fn, name, stats, key):
    """``stats[key]`` as an array; a clear error when the key is missing."""
    if key not in stats:
        raise ValueError(f"{fn}: {name} must hold {key!r}; got keys {sorted(stats)}")
    return _float(fn, f"{name}[{key!r}]", stats[key])


def _check_affine(fn, name, params, n, of="the layer's {n} output features"):
    """``params['scale']`` / ``params['bias']`` (each optional; ``name`` is the
    argument's): floating and ``(n,)``."""
    for k in ("scale", "bias"):
        v = params.get(k)
        v = None if v is None else _float(fn, f"{name}[{k!r}]", v)
        _check_n(fn, f"{name}[{k!r}]", v, n, of)


def _check_norm(fn, prefix, params, stats, keys, n, of="the layer's {n} output features"):
    """Per-feature vectors of a normalization layer: ``stats[k]`` for ``k`` in ``keys``
    (required) and ``params['scale']`` / ``params['bias']`` (optional) must be ``(n,)``."""
    for k in keys:
        _check_n(fn, f"{prefix}_stats[{k!r}]", _stat(fn, f"{prefix}_stats", stats, k), n, of)
    _check_affine(fn, f"{prefix}_params", params, n, of)


def batch_norm_affine(bn_params, bn_stats, *, epsilon: float):
    """Eval-mode BatchNorm as ``y = a * x + c`` per feature.

    The closed form of docs/derivations.md, "Inference form".

    ``bn_params`` may lack ``scale`` / ``bias`` (use_scale / use_bias False).
    ``epsilon`` is the layer's (``layer.epsilon``); it has no default, so that a fold
    cannot silently use another value than the layer it replaces.

    Args:
      bn_params: the layer's ``params``: ``{"scale": (N,), "bias": (N,)}``, either
        optional (``None`` or ``{}`` when the layer has neither).
      bn_stats: the layer's ``batch_stats``: ``{"mean": (N,), "var": (N,)}``.
      epsilon: the layer's epsilon.

    Returns:
      ``(a, c)``, each ``(N,)``, in at least float32.
    """
    fn = "batch_norm_affine"
    return _bn_affine(fn, bn_params, bn_stats, C.epsilon(fn, epsilon))


def _bn_affine(fn, bn_params, bn_stats, epsilon, n=None):
    """:func:`batch_norm_affine` with its checks named ``fn``: the vectors must be ``(n,)``
    to match the layer's ``n`` output features, or, without ``n``, the mean's length."""
    bn_params = _variables(fn, "bn_params", bn_params, "BatchNorm", optional=True)
    bn_stats = _variables(fn, "bn_stats", bn_stats, "BatchNorm")
    mean = _stat(fn, "bn_stats", bn_stats, "mean")
    of = "the layer's {n} output features"
    if n is None:
        if mean.ndim != 1:
            raise ValueError(
                f"{fn}: bn_stats['mean'] must have shape (N,) (one value per feature); "
                f"got {S.shape_str(mean.shape)}"
            )
        n, of = mean.shape[0], "bn_stats['mean'] ({n} features)"
    _check_norm(fn, "bn", bn_params, bn_stats, ("mean", "var"), n, of)
    var = _stat(fn, "bn_stats", bn_stats, "var")
    cd = _dtype(mean, var)
    inv = jax.lax.rsqrt(var.astype(cd) + epsilon)
    scale = bn_params.get("scale")
    bias = bn_params.get("bias")
    a = inv if scale is None else jnp.asarray(scale).astype(cd) * inv
    c = -a * mean.astype(cd)
    if bias is not None:
        c = c + jnp.asarray(bias).astype(cd)
    return a, c


def fold_batch_norm(layer_params, bn_params, bn_stats, *, epsilon: float):
    """Merge an eval-mode BatchNorm into the Dense/Conv before it: ``{kernel, bias}``.

    Args:
      layer_params: the Dense/Conv parameters, ``{"kernel": (..., in, out), "bias": (out,)}``
        (``bias`` may be missing).
      bn_params, bn_stats: the BatchNorm's ``params`` and ``batch_stats`` (as in
        :func:`batch_norm_affine`); ``N`` must equal the layer's ``out``.
      epsilon: the BatchNorm layer's own (``bn.epsilon``), required.

    Returns:
      ``{"kernel": K diag(a), "bias": a b + c}``, in at least float32.
    """
    fn = "fold_batch_norm"
    epsilon = C.epsilon(fn, epsilon)
    k, b = _layer(fn, layer_params)
    a, c = _bn_affine(fn, bn_params, bn_stats, epsilon, n=k.shape[-1])
    cd = _dtype(k, a)
    new_b = c if b is None else a * b.astype(cd) + c
    return {"kernel": k.astype(cd) * a, "bias": new_b}


def fold_batch_center(layer_params, bc_params, bc_stats):
    """Merge an eval-mode BatchCenter (``y = x - mean + bias``) into the layer before.

    Args:
      layer_params: the Dense/Conv parameters, ``{"kernel": (..., in, out), "bias": (out,)}``
        (``bias`` may be missing).
      bc_params: the BatchCenter's ``params`` (``{"bias": (out,)}``, or ``{}`` / ``None``).
      bc_stats: its ``batch_stats``: ``{"mean": (out,)}``.

    Returns:
      ``{"kernel": K, "bias": b - mean + bias}``, in at least float32.
    """
    fn = "fold_batch_center"
    k, b = _layer(fn, layer_params)
    bc_params = _variables(fn, "bc_params", bc_params, "BatchCenter", optional=True)
    bc_stats = _variables(fn, "bc_stats", bc_stats, "BatchCenter")
    _check_norm(fn, "bc", bc_params, bc_stats, ("mean",), k.shape[-1])
    mean = jnp.asarray(bc_stats["mean"])
    cd = _dtype(k, mean)
    new_b = -mean.astype(cd) if b is None else b.astype(cd) - mean.astype(cd)
    if bc_params.get("bias") is not None:
        new_b = new_b + jnp.asarray(bc_params["bias"]).astype(cd)
    return {"kernel": k.astype(cd), "bias": new_b}


def inhib_options(module) -> dict:
    """The op options of a linen or NNX BatchInhib module (its
    :class:`~jax_batchinhib.ops.batch_inhib.InhibOptions`, validated, guard resolved) as
    keyword arguments for :func:`inhib_map` and the fold functions.

    Args:
      module: a :class:`jax_batchinhib.linen.BatchInhib` or
        :class:`jax_batchinhib.nnx.BatchInhib`.

    Returns:
      A dict with keys rho, epsilon, groups, correlation, denominator, guard,
      guard_mode.
    """
    if not any(c.__name__ == "BatchInhib" for c in type(module).__mro__):
        raise TypeError(
            f"inhib_options: module must be a jax_batchinhib linen or NNX BatchInhib; got "
            f"{type(module).__name__}"
        )
    return M.inhib_options(type(module).__name__, module).kwargs()


def _inhib_checked(fn, inhib_params, inhib_stats, options, n=None, side="outputs"):
    """A BatchInhib's variables and options checked against each other (and against the
    layer's ``n`` features on ``side`` when given), with errors that name ``fn``. Returns
    the validated options as keyword arguments for :func:`inhibition_matrix`."""
    fields = {f.name for f in dataclasses.fields(InhibOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"{fn}: unexpected option(s) {unknown}; the options are {sorted(fields)} "
            f"(pass **fold.inhib_options(module))"
        )
    opts = InhibOptions.checked(fn, **options)
    g = opts.groups
    inhib_params = _variables(fn, "inhib_params", inhib_params, "BatchInhib")
    inhib_stats = _variables(fn, "inhib_stats", inhib_stats, "BatchInhib")
    alpha = _stat(fn, "inhib_params", inhib_params, "alpha")
    cov = _stat(fn, "inhib_stats", inhib_stats, "cov")
    ash = tuple(alpha.shape)
    square = len(ash) in (2, 3) and ash[-1] == ash[-2]
    if not square:
        raise ValueError(
            f"{fn}: inhib_params['alpha'] must have shape (N, N), or (groups, N/groups, "
            f"N/groups) with groups > 1; got {S.shape_str(ash)}"
        )
    nfeat = ash[-1] * (ash[0] if len(ash) == 3 else 1)
    if n is not None and nfeat != n:
        raise ValueError(
            f"{fn}: the BatchInhib has {nfeat} features (inhib_params['alpha'] of shape "
            f"{S.shape_str(ash)}) but the layer has {n} {side}"
        )
    hint = ""
    if len(ash) == 3 and ash[0] != g:
        hint = (
            f"; grouped variables: pass the module's options, "
            f"**fold.inhib_options(module) (here groups={ash[0]})"
        )
    if nfeat % g:
        raise ValueError(
            f"{fn}: groups={g} must divide the BatchInhib's {nfeat} features (inhib_params"
            f"['alpha'] of shape {S.shape_str(ash)}){hint}"
        )
    want = alpha_shape(nfeat, g)
    if ash != want:
        raise ValueError(
            f"{fn}: inhib_params['alpha'] must have shape {S.shape_str(want)} for "
            f"{nfeat} features and groups={g}; got {S.shape_str(ash)}{hint}"
        )
    k = nfeat // g
    cwant = ((g, k, k),) + (((k, k),) if g == 1 else ())
    if tuple(cov.shape) not in cwant:
        alt = f" or {S.shape_str((k, k))}" if g == 1 else ""
        raise ValueError(
            f"{fn}: inhib_stats['cov'] must have shape {S.shape_str((g, k, k))}{alt} for "
            f"{nfeat} features and groups={g}; got {S.shape_str(cov.shape)}"
        )
    return opts.kwargs()


def _conv_groups(fn, feature_group_count, groups, what):
    """The conv's G, checked: an int >= 1 that divides the layer's ``groups`` (``what``
    names the layer), so that its blocks lie inside the conv's groups."""
    gc = C.positive_int(fn, "feature_group_count", feature_group_count)
    if groups % gc:
        raise ValueError(
            f"{fn}: the {what} with groups={groups} mixes features across the conv's "
            f"feature_group_count={gc} groups, which a grouped kernel cannot hold; folding "
            f"needs groups to be a multiple of feature_group_count (or an ungrouped conv)"
        )
    return gc


def _inhib_map(inhib_params, inhib_stats, options):
    R = inhibition_matrix(inhib_stats["cov"], inhib_params["alpha"], **options)
    rt = [R[g].T for g in range(R.shape[0])]
    m = rt[0] if len(rt) == 1 else block_diag(*rt)
    return jnp.eye(m.shape[0], dtype=m.dtype) - m


def inhib_map(inhib_params, inhib_stats, **options):
    """The matrix M (N, N) of an eval-mode BatchInhib, ``y = x @ M``, ``M = I - R^T``
    block diagonal over the groups; R from the running covariance ``inhib_stats['cov']``
    and ``inhib_params['alpha']``. ``options``: the layer's rho, epsilon, groups,
    correlation, denominator, guard (see :func:`inhib_options`).

    Args:
      inhib_params: the BatchInhib's ``params``: ``{"alpha": alpha_shape(N, groups)}``.
      inhib_stats: its ``batch_stats`` with ``"cov"``: ``(groups, N/groups, N/groups)``.
      **options: the layer's options, :func:`inhib_options` of the module.

    Returns:
      M, ``(N, N)``, in at least float32.
    """
    options = _inhib_checked("inhib_map", inhib_params, inhib_stats, options)
    return _inhib_map(inhib_params, inhib_stats, options)


def fold_batch_inhib_after(
    layer_params, inhib_params, inhib_stats, *, feature_group_count: int = 1, **options
):
    """Merge an eval-mode BatchInhib into the Dense/Conv *before* it (layer -> inhib):
    ``K' = K M``, ``b' = b M``.

    Args:
      layer_params: the Dense/Conv parameters, ``{"kernel": (..., in, out), "bias": (out,)}``
        (``bias`` may be missing).
      inhib_params, inhib_stats, **options: as in :func:`inhib_map`; ``N`` must equal
        the layer's ``out``.
      feature_group_count: the Conv's (its kernel does not show it): for a grouped Conv
        the BatchInhib's ``groups`` must be a multiple of it, else ValueError.

    Returns:
      ``{"kernel": K M, "bias": b M}`` (``b`` = 0 when missing), in at least float32.
    """
    fn = "fold_batch_inhib_after"
    k, b = _layer(fn, layer_params)
    options = _inhib_checked(fn, inhib_params, inhib_stats, options, k.shape[-1], "outputs")
    _conv_groups(fn, feature_group_count, options["groups"], "BatchInhib")
    m = _inhib_map(inhib_params, inhib_stats, options)
    cd = _dtype(k, m)
    hi = S.PRECISION
    new_k = jnp.einsum("...j,jo->...o", k.astype(cd), m.astype(cd), precision=hi)
    new_b = jnp.zeros((m.shape[0],), cd) if b is None else jnp.dot(b.astype(cd), m, precision=hi)
    return {"kernel": new_k, "bias": new_b}


def fold_batch_inhib_before(
    layer_params, inhib_params, inhib_stats, *, feature_group_count: int = 1, **options
):
    """Merge an eval-mode BatchInhib into the Dense/Conv *after* it (inhib -> layer):
    ``K'[..., i, o] = sum_j M[i, j] K[..., j, o]``, bias unchanged.

    Args:
      layer_params: the Dense/Conv parameters, ``{"kernel": (..., in, out), "bias": (out,)}``
        (``bias`` may be missing).
      inhib_params, inhib_stats, **options: as in :func:`inhib_map`; ``N`` must equal
        the layer's ``in``.
      feature_group_count: the Conv's G (kernel ``(..., in/G, out)``): the sum runs
        within each of its groups; the BatchInhib's ``groups`` must be a multiple of G.

    Returns:
      ``{"kernel": M K, "bias": b}`` (``b`` = 0 when missing), in at least float32.
    """
    fn = "fold_batch_inhib_before"
    k, b = _layer(fn, layer_params)
    gc = C.positive_int(fn, "feature_group_count", feature_group_count)
    if k.shape[-1] % gc:
        raise ValueError(
            f"{fn}: feature_group_count={gc} must divide the layer's {k.shape[-1]} outputs"
        )
    n_in = k.shape[-2] * gc
    options = _inhib_checked(fn, inhib_params, inhib_stats, options, n_in, "inputs")
    _conv_groups(fn, gc, options["groups"], "BatchInhib")
    m = _inhib_map(inhib_params, inhib_stats, options)
    cd = _dtype(k, m)
    # per conv group c: K'[..., i, c, o] = sum_j M_c[i, j] K[..., j, c, o], M_c its block
    kg = k.astype(cd).reshape(*k.shape[:-1], gc, k.shape[-1] // gc)
    ng = k.shape[-2]
    mc = jnp.stack([m[c * ng : (c + 1) * ng, c * ng : (c + 1) * ng] for c in range(gc)])
    new_k = jnp.einsum("cij,...jco->...ico", mc.astype(cd), kg, precision=S.PRECISION)
    new_k = new_k.reshape(k.shape)
    new_b = jnp.zeros((k.shape[-1],), cd) if b is None else b.astype(cd)
    return {"kernel": new_k, "bias": new_b}


def fold_whitening_after(
    layer_params, module_params, batch_stats, *, groups: int = 1, feature_group_count: int = 1
):
    """Merge an eval-mode IterNorm or ZCANorm into the Dense/Conv *before* it
    (layer -> whitening): with W = blockdiag(``batch_stats['whitening_matrix']``),
    ``K' = K W diag(scale)``, ``b' = ((b - mean) W) * scale + bias``.

    ``module_params`` may lack ``scale`` / ``bias`` (use_scale / use_bias False; ``None``
    when it has neither);
    ``groups`` is the module's (W may also be given as ``(N, N)`` with groups=1);
    ``feature_group_count`` the Conv's, of which ``groups`` must be a multiple.
    """
    fn = "fold_whitening_after"
    k, b = _layer(fn, layer_params)
    n = k.shape[-1]
    layer = "IterNorm or ZCANorm"
    module_params = _variables(fn, "module_params", module_params, layer, optional=True)
    batch_stats = _variables(fn, "batch_stats", batch_stats, layer)
    mean = _stat(fn, "batch_stats", batch_stats, "mean")
    wm = _stat(fn, "batch_stats", batch_stats, "whitening_matrix")
    _check_n(fn, "batch_stats['mean']", mean, n)
    _check_affine(fn, "module_params", module_params, n)
    msg = f"{fn}: groups must be an int >= 1 dividing the layer's {n} output features; "
    if not C.is_int(groups):
        raise TypeError(msg + f"got {groups!r}")
    if groups < 1 or n % groups:
        raise ValueError(msg + f"got {groups!r}")
    _conv_groups(fn, feature_group_count, int(groups), "whitening layer")
    g, ng = int(groups), n // groups
    if wm.shape not in ((g, ng, ng),) + (((ng, ng),) if g == 1 else ()):
        hint = ""
        if wm.ndim == 3 and wm.shape[0] != g and wm.shape[0] * wm.shape[-1] == n:
            hint = f"; grouped statistics: pass the module's groups (here groups={wm.shape[0]})"
        raise ValueError(
            f"{fn}: batch_stats['whitening_matrix'] must have shape {S.shape_str((g, ng, ng))} "
            f"for {n} features and groups={g}; got {S.shape_str(wm.shape)}{hint}"
        )
    wm = wm.reshape(g, ng, ng)
    w = wm[0] if g == 1 else block_diag(*[wm[i] for i in range(g)])
    scale, bias = module_params.get("scale"), module_params.get("bias")
    cd = _dtype(k, mean, w)
    hi = S.PRECISION
    w = w.astype(cd)
    if scale is not None:
        w = w * jnp.asarray(scale).astype(cd)  # W diag(scale): scale each column
    new_k = jnp.einsum("...j,jo->...o", k.astype(cd), w, precision=hi)
    c = -mean.astype(cd) if b is None else b.astype(cd) - mean.astype(cd)
    new_b = jnp.dot(c, w, precision=hi)
    if bias is not None:
        new_b = new_b + jnp.asarray(bias).astype(cd)
    return {"kernel": new_k, "bias": new_b}
