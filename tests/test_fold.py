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
    want = bn.apply({"params": bp, "batch_stats": {"mean": st["mean"], "var": st["var"]}}, h)
    folded = fold.fold_batch_norm(lp, bp, st, epsilon=1e-3)
    np.testing.assert_allclose(layer.apply({"params": folded}, x), want, atol=ATOL)
    bc = bnn.BatchCenter(use_running_average=True)
    cp = params_of(bc, h, jax.random.key(4))
    want = bc.apply({"params": cp, "batch_stats": {"mean": st["mean"]}}, h)
    folded = fold.fold_batch_center(lp, cp, st)
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


def test_fold_errors_name_the_function():
    lp = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"fold_batch_norm: bn_stats\['mean'\] must have shape"):
        fold.fold_batch_norm(lp, {}, {"mean": jnp.zeros(5), "var": jnp.ones(5)}, epsilon=1e-5)
    with pytest.raises(ValueError, match=r"fold_batch_center: layer_params must hold 'kernel'"):
        fold.fold_batch_center({"w": 1}, {}, {"mean": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"fold_batch_inhib_before: the BatchInhib has 4"):
        fold.fold_batch_inhib_before(lp, {"alpha": jnp.zeros((4, 4))}, {"cov": jnp.eye(4)})
