"""Folding eval-mode layers into Dense/Conv: the folded plain-flax layer gives the
unfolded eval-mode output. Statistics are non-trivial (random positive variances, a
random SPD covariance, alpha ~ N(0, 1)), so every term of the closed forms matters.
float32: outputs of O(1-10) agree to 1e-4 absolute (a reassociated sum of 6-12 products).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib import fold
from jax_batchinhib import linen as bnn

ATOL = 1e-4


def rand_stats(key, n, groups=1):
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.normal(k3, (groups, n // groups, n // groups))
    cov = jnp.einsum("gij,gkj->gik", a, a) + 0.1 * jnp.eye(n // groups)
    return {
        "mean": jax.random.normal(k1, (n,)),
        "var": jax.random.uniform(k2, (n,), minval=0.2, maxval=3.0),
        "cov": cov[0] if groups == 1 else cov,
    }


def layers(kind, feats):
    if kind == "dense":
        return nn.Dense(feats), jax.random.normal(jax.random.key(0), (6, 5))
    return nn.Conv(feats, (3, 3), padding="SAME"), jax.random.normal(
        jax.random.key(0), (2, 5, 5, 3)
    )


def params_of(mdl, x, key, **kw):
    v = mdl.init(key, x, **kw)
    return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(key, p.shape), v["params"])


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_fold_batch_norm_and_batch_center_into_preceding_layer(kind):
    layer, x = layers(kind, 4)
    lp = params_of(layer, x, jax.random.key(1))
    h = layer.apply({"params": lp}, x)
    st = rand_stats(jax.random.key(2), 4)
    bn = bnn.BatchNorm(use_running_average=True, epsilon=1e-3)
    bp = params_of(bn, h, jax.random.key(3))
    bn_st = {"mean": st["mean"], "var": st["var"]}
    want = bn.apply({"params": bp, "batch_stats": bn_st}, h)
    folded = fold.fold_batch_norm(lp, bp, bn_st, epsilon=1e-3)
    np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)
    bc = bnn.BatchCenter(use_running_average=True)
    cp = params_of(bc, h, jax.random.key(4))
    want = bc.apply({"params": cp, "batch_stats": {"mean": st["mean"]}}, h)
    folded = fold.fold_batch_center(lp, cp, {"mean": st["mean"]})
    np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_fold_batch_inhib_before_and_after_a_layer(kind):
    groups = 2
    bi = bnn.BatchInhib(use_running_average=True, groups=groups, rho=2.0, denominator="abs")
    opts = fold.inhib_options(bi)
    layer, x = layers(kind, 4)
    lp = params_of(layer, x, jax.random.key(1))
    h = layer.apply({"params": lp}, x)
    ip = {"alpha": jax.random.normal(jax.random.key(5), (groups, 2, 2))}
    st = rand_stats(jax.random.key(6), 4, groups)
    # layer -> inhib
    want = bi.apply({"params": ip, "batch_stats": st}, h)
    assert float(jnp.abs(want - h).max()) > 0.1  # the inhibition does something
    folded = fold.fold_batch_inhib_after(lp, ip, st, **opts)
    np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)
    # inhib -> layer (the input has 5 or 3 features: use a 1-group inhib over them)
    n_in = x.shape[-1]
    bi1 = bnn.BatchInhib(use_running_average=True)
    ip1 = {"alpha": jax.random.normal(jax.random.key(7), (n_in, n_in))}
    st1 = rand_stats(jax.random.key(8), n_in)
    want = layer.apply({"params": lp}, bi1.apply({"params": ip1, "batch_stats": st1}, x))
    folded = fold.fold_batch_inhib_before(lp, ip1, st1, **fold.inhib_options(bi1))
    np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)


@pytest.mark.parametrize("conv_groups, groups", [(2, 2), (2, 4), (1, 2)])
def test_fold_into_a_grouped_conv(conv_groups, groups):
    """A Conv with ``feature_group_count`` G: BatchInhib after and before it and ZCANorm
    after it fold exactly when the layer's groups are a multiple of G (its blocks stay
    inside the conv's groups). Before, the after-folds took no G and mixed the conv's
    groups silently (output off by 149 where its largest entry was 146), and the
    before-fold refused with "the layer has 2 inputs" for a conv with 4. 8 channels, so
    every block of the layer (4 or 2 features) mixes features: a diagonal map would fold
    into any conv."""
    n = 8
    conv = nn.Conv(n, (3, 3), padding="SAME", feature_group_count=conv_groups)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, n))
    lp = params_of(conv, x, jax.random.key(1))
    h = conv.apply({"params": lp}, x)
    bi = bnn.BatchInhib(use_running_average=True, groups=groups, rho=2.0)
    opts = dict(fold.inhib_options(bi), feature_group_count=conv_groups)
    k = n // groups
    ip = {"alpha": jax.random.normal(jax.random.key(5), (groups, k, k) if groups > 1 else (k, k))}
    st = rand_stats(jax.random.key(6), n, groups)
    want = bi.apply({"params": ip, "batch_stats": st}, h)
    assert float(jnp.abs(want - h).max()) > 0.1  # the inhibition does something
    folded = fold.fold_batch_inhib_after(lp, ip, st, **opts)
    np.testing.assert_allclose(conv.apply({"params": folded}, x), want, atol=ATOL)
    want = conv.apply({"params": lp}, bi.apply({"params": ip, "batch_stats": st}, x))
    folded = fold.fold_batch_inhib_before(lp, ip, st, **opts)
    np.testing.assert_allclose(conv.apply({"params": folded}, x), want, atol=ATOL)
    zn = bnn.ZCANorm(use_running_average=True, groups=groups)
    mp = params_of(zn, h, jax.random.key(3))
    w = jnp.eye(k) + 0.5 * jax.random.normal(jax.random.key(4), (groups, k, k))
    zs = {"mean": jax.random.normal(jax.random.key(2), (n,)), "whitening_matrix": w}
    want = zn.apply({"params": mp, "batch_stats": zs}, h)
    folded = fold.fold_whitening_after(lp, mp, zs, groups=groups, feature_group_count=conv_groups)
    np.testing.assert_allclose(conv.apply({"params": folded}, x), want, atol=ATOL)


def test_fold_into_a_grouped_conv_refuses_groups_that_mix_its_groups():
    lp = {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}  # a Conv 4 -> 4, G = 2
    ip, st = {"alpha": jnp.zeros((4, 4))}, {"cov": jnp.eye(4)}
    msg = (
        r"the BatchInhib with groups=1 mixes features across the conv's "
        r"feature_group_count=2 groups, which a grouped kernel cannot hold"
    )
    for f in (fold.fold_batch_inhib_after, fold.fold_batch_inhib_before):
        with pytest.raises(ValueError, match=rf"^{f.__name__}: {msg}"):
            f(lp, ip, st, feature_group_count=2)
    ws = {"mean": jnp.zeros(4), "whitening_matrix": jnp.eye(4)[None]}
    with pytest.raises(ValueError, match=r"^fold_whitening_after: the whitening layer with"):
        fold.fold_whitening_after(lp, {}, ws, feature_group_count=2)
    with pytest.raises(TypeError, match=r"^fold_batch_inhib_after: feature_group_count must"):
        fold.fold_batch_inhib_after(lp, ip, st, feature_group_count=2.0)


def test_fold_inhib_dtype_and_module_errors_name_the_function():
    """An integer alpha or cov is named as the fold's argument (it was reported by the
    internal ``inhibition_matrix``), and ``inhib_options`` of a module that is not a
    BatchInhib is a TypeError naming it (it was flax's AttributeError for ``rho``)."""
    lp = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    with pytest.raises(TypeError, match=r"^fold_batch_inhib_after: inhib_params\['alpha'\] "):
        fold.fold_batch_inhib_after(
            lp, {"alpha": jnp.zeros((4, 4), jnp.int32)}, {"cov": jnp.eye(4)}
        )
    with pytest.raises(TypeError, match=r"^inhib_map: inhib_stats\['cov'\] must be a float"):
        fold.inhib_map({"alpha": jnp.zeros((4, 4))}, {"cov": jnp.eye(4, dtype=jnp.int32)})
    for mdl in (bnn.BatchNorm(), bnn.ZCANorm()):
        with pytest.raises(TypeError, match=r"^inhib_options: module must be a jax_batchinhib"):
            fold.inhib_options(mdl)


def test_fold_errors_name_the_function():
    lp = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"fold_batch_norm: bn_stats\['mean'\] must have shape"):
        fold.fold_batch_norm(lp, {}, {"mean": jnp.zeros(5), "var": jnp.ones(5)}, epsilon=1e-5)
    with pytest.raises(ValueError, match=r"fold_batch_center: layer_params must hold 'kernel'"):
        fold.fold_batch_center({"w": 1}, {}, {"mean": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"fold_batch_inhib_before: the BatchInhib has 4"):
        fold.fold_batch_inhib_before(lp, {"alpha": jnp.zeros((4, 4))}, {"cov": jnp.eye(4)})


def test_a_layer_without_parameters_folds_from_none():
    """A linen BatchNorm (or whitening layer) with use_scale=False, use_bias=False has no
    'params' collection: ``variables.get('params')`` is None, which the folds take as {}
    (it was an AttributeError on None)."""
    layer, x = layers("dense", 4)
    lp = params_of(layer, x, jax.random.key(1))
    h = layer.apply({"params": lp}, x)
    for mdl, f in (
        (bnn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False),
         lambda v: fold.fold_batch_norm(lp, v.get("params"), v["batch_stats"], epsilon=1e-5)),
        (bnn.BatchCenter(use_running_average=True, use_bias=False),
         lambda v: fold.fold_batch_center(lp, v.get("params"), v["batch_stats"])),
        (bnn.ZCANorm(use_running_average=True, use_scale=False, use_bias=False),
         lambda v: fold.fold_whitening_after(lp, v.get("params"), v["batch_stats"])),
    ):  # fmt: skip
        v = mdl.init(jax.random.key(2), h)
        assert "params" not in v
        v = {"batch_stats": jax.tree.map(lambda a: a + 0.5, v["batch_stats"])}
        np.testing.assert_allclose(layer.apply({"params": f(v)}, x), mdl.apply(v, h), atol=ATOL)


def test_fold_arguments_must_be_this_layers_variables():
    """A non-mapping argument is a TypeError naming the fold and the argument (they were
    Python's errors about None or an Array); a complex kernel, scale or statistic is
    refused (its imaginary part was dropped by the cast); another layer's variables (a
    BatchNorm's 'scale' and 'var' given to fold_batch_center) are refused, where they
    were ignored and the fold came out wrong."""
    lp = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    st = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
    for bad, what in ((None, "NoneType"), (lp["kernel"], "ArrayImpl")):
        with pytest.raises(
            TypeError, match=rf"^fold_batch_norm: layer_params must be a map.*{what}"
        ):
            fold.fold_batch_norm(bad, {}, st, epsilon=1e-5)
    with pytest.raises(TypeError, match=r"^fold_batch_norm: bn_stats must be a mapping"):
        fold.fold_batch_norm(lp, {}, [st["mean"], st["var"]], epsilon=1e-5)
    with pytest.raises(TypeError, match=r"^fold_batch_inhib_after: inhib_params must be a map"):
        fold.fold_batch_inhib_after(lp, bnn.BatchInhib(), {"cov": jnp.eye(2)})
    cplx = jnp.array([1 + 5j, 2 + 0j])
    with pytest.raises(TypeError, match=r"^fold_batch_norm: bn_params\['scale'\] must be a float"):
        fold.fold_batch_norm(lp, {"scale": cplx}, st, epsilon=1e-5)
    with pytest.raises(TypeError, match=r"^fold_batch_center: bc_params\['bias'\] must be a float"):
        fold.fold_batch_center(lp, {"bias": cplx}, {"mean": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"^fold_whitening_after: layer_params\['kernel'\] must"):
        fold.fold_whitening_after(
            {"kernel": lp["kernel"].astype(jnp.complex64)},
            {},
            {"mean": jnp.zeros(2), "whitening_matrix": jnp.eye(2)},
        )
    with pytest.raises(
        TypeError, match=r"^fold_batch_norm: bn_stats\['mean'\] must be a float.*None"
    ):
        fold.fold_batch_norm(lp, {}, {"mean": None, "var": st["var"]}, epsilon=1e-5)
    with pytest.raises(ValueError, match=r"^fold_batch_center: bc_params holds \['scale'\]"):
        fold.fold_batch_center(
            lp, {"scale": jnp.ones(2), "bias": jnp.zeros(2)}, {"mean": st["mean"]}
        )
    with pytest.raises(ValueError, match=r"^fold_batch_center: bc_stats holds \['var'\]"):
        fold.fold_batch_center(lp, {}, st)
    with pytest.raises(ValueError, match=r"^fold_batch_norm: bn_stats holds \['cov'\]"):
        fold.fold_batch_norm(lp, {}, {**st, "cov": jnp.eye(2)}, epsilon=1e-5)
    # a whole NNX state given as both params and stats is this layer's variables: fine
    whole = {"scale": jnp.ones(2), "bias": jnp.zeros(2), **st, "count": jnp.ones(())}
    fold.fold_batch_norm(lp, whole, whole, epsilon=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_fold_whitening_into_preceding_layer(kind):
    """Dense/Conv -> IterNorm/ZCANorm (eval) equals the folded layer: a random running
    mean, a random non-symmetric block-diagonal W (2 groups), random scale and bias."""
    layer, x = layers(kind, 4)
    lp = params_of(layer, x, jax.random.key(1))
    h = layer.apply({"params": lp}, x)
    k1, k2 = jax.random.split(jax.random.key(9))
    st = {
        "mean": jax.random.normal(k1, (4,)),
        "whitening_matrix": jnp.eye(2) + 0.5 * jax.random.normal(k2, (2, 2, 2)),
    }
    for mdl in (
        bnn.IterNorm(use_running_average=True, groups=2),
        bnn.ZCANorm(use_running_average=True, groups=2, use_bias=False),
    ):
        mp = params_of(mdl, h, jax.random.key(3))
        want = mdl.apply({"params": mp, "batch_stats": st}, h)
        folded = fold.fold_whitening_after(lp, mp, st, groups=2)
        np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)
    with pytest.raises(ValueError, match=r"fold_whitening_after: groups must be .* dividing"):
        fold.fold_whitening_after(lp, mp, st, groups=3)


# ------------------------------------------------- shapes checked against each other


def _fold_error(match, f, *args, **kw):
    with pytest.raises(ValueError, match=match):
        f(*args, **kw)


LP = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}  # a Dense 3 -> 4
LP_BAD_BIAS = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(5)}


def test_fold_batch_norm_checks_every_shape():
    """The layer's bias, the BatchNorm's scale, bias and statistics against the layer's 4
    outputs, with errors that name fold_batch_norm and the argument (a raw broadcasting
    error from jnp before)."""
    st = {"mean": jnp.zeros(4), "var": jnp.ones(4)}
    want = r"must have shape \(4,\) to match the layer's 4 output features; got \(5,\)"
    fn = fold.fold_batch_norm
    _fold_error(rf"fold_batch_norm: layer_params\['bias'\] {want}", fn, LP_BAD_BIAS, {}, st,
                epsilon=1e-5)  # fmt: skip
    _fold_error(rf"fold_batch_norm: bn_stats\['var'\] {want}", fn, LP, {},
                {"mean": jnp.zeros(4), "var": jnp.ones(5)}, epsilon=1e-5)  # fmt: skip
    for k in ("scale", "bias"):
        _fold_error(rf"fold_batch_norm: bn_params\['{k}'\] {want}", fn, LP, {k: jnp.ones(5)},
                    st, epsilon=1e-5)  # fmt: skip
    _fold_error(r"fold_batch_norm: bn_stats must hold 'var'; got keys \['mean'\]", fn, LP, {},
                {"mean": jnp.zeros(4)}, epsilon=1e-5)  # fmt: skip
    _fold_error(r"fold_batch_norm: layer_params\['kernel'\] must have shape \(\.\.\., in, out\)",
                fn, {"kernel": jnp.ones(4)}, {}, st, epsilon=1e-5)  # fmt: skip
    _fold_error(
        r"batch_norm_affine: bn_stats\['var'\] must have shape \(4,\) to match "
        r"bn_stats\['mean'\] \(4 features\); got \(5,\)",
        fold.batch_norm_affine, {}, {"mean": jnp.zeros(4), "var": jnp.ones(5)}, epsilon=1e-5,
    )  # fmt: skip


def test_fold_batch_center_checks_every_shape():
    st = {"mean": jnp.zeros(4)}
    want = r"must have shape \(4,\) to match the layer's 4 output features; got \(5,\)"
    fn = fold.fold_batch_center
    _fold_error(rf"fold_batch_center: layer_params\['bias'\] {want}", fn, LP_BAD_BIAS, {}, st)
    _fold_error(rf"fold_batch_center: bc_params\['bias'\] {want}", fn, LP, {"bias": jnp.ones(5)},
                st)  # fmt: skip


GROUPED = ({"alpha": jnp.zeros((2, 2, 2))}, {"cov": jnp.stack([jnp.eye(2)] * 2)})  # groups=2


@pytest.mark.parametrize("name", ["fold_batch_inhib_after", "fold_batch_inhib_before"])
def test_fold_batch_inhib_checks_every_shape(name):
    """The layer's bias; grouped variables without ``groups`` (the error named
    inhibition_matrix before); cov against alpha and groups. fold_batch_inhib_before
    returned the mismatched bias (5,) of a layer with 4 outputs unchanged, silently."""
    f = getattr(fold, name)
    lp = LP if name.endswith("after") else {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
    n_out = lp["kernel"].shape[-1]
    bad = {"kernel": lp["kernel"], "bias": jnp.zeros(5)}
    ip, st = GROUPED
    _fold_error(
        rf"{name}: layer_params\['bias'\] must have shape \({n_out},\) to match the layer's "
        rf"{n_out} output features; got \(5,\)",
        f, bad, ip, st, groups=2,
    )  # fmt: skip
    _fold_error(
        rf"{name}: inhib_params\['alpha'\] must have shape \(4, 4\) for 4 features and "
        r"groups=1; got \(2, 2, 2\); grouped variables: pass the module's options, "
        r"\*\*fold.inhib_options\(module\) \(here groups=2\)",
        f, lp, ip, st,
    )  # fmt: skip
    _fold_error(
        rf"{name}: inhib_stats\['cov'\] must have shape \(2, 2, 2\) for 4 features and "
        r"groups=2; got \(4, 4\)",
        f, lp, ip, {"cov": jnp.eye(4)}, groups=2,
    )  # fmt: skip
    _fold_error(rf"{name}: inhib_stats must hold 'cov'", f, lp, ip, {}, groups=2)
    with pytest.raises(TypeError, match=rf"{name}: unexpected option\(s\) \['group'\]"):
        f(lp, ip, st, group=2)
    folded = f(lp, ip, st, groups=2)  # the right options fold
    assert folded["kernel"].shape == lp["kernel"].shape and folded["bias"].shape == (n_out,)


def test_inhib_map_errors_name_inhib_map():
    ip, st = GROUPED
    _fold_error(r"inhib_map: inhib_params\['alpha'\] must have shape \(4, 4\) .*groups=2\)",
                fold.inhib_map, ip, st)  # fmt: skip
    assert fold.inhib_map(ip, st, groups=2).shape == (4, 4)


def test_fold_whitening_after_checks_every_shape():
    ws = {"mean": jnp.zeros(4), "whitening_matrix": jnp.stack([jnp.eye(2)] * 2)}
    want = r"must have shape \(4,\) to match the layer's 4 output features; got \(5,\)"
    fn = fold.fold_whitening_after
    _fold_error(rf"fold_whitening_after: layer_params\['bias'\] {want}", fn, LP_BAD_BIAS, {}, ws,
                groups=2)  # fmt: skip
    for k in ("scale", "bias"):
        _fold_error(rf"fold_whitening_after: module_params\['{k}'\] {want}", fn, LP,
                    {k: jnp.ones(5)}, ws, groups=2)  # fmt: skip
    _fold_error(
        r"fold_whitening_after: batch_stats\['whitening_matrix'\] must have shape \(1, 4, 4\) "
        r"for 4 features and groups=1; got \(2, 2, 2\); grouped statistics: pass the "
        r"module's groups \(here groups=2\)",
        fn, LP, {}, ws,
    )  # fmt: skip
    for bad in (2.0, True):  # the wrong type: TypeError (a ValueError before)
        with pytest.raises(TypeError, match=r"fold_whitening_after: groups must be an int >= 1"):
            fn(LP, {}, ws, groups=bad)
