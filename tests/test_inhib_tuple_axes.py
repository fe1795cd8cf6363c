"""The linen and NNX BatchInhib modules with several feature axes (``axis=(1, 3)``).

The feature axes are moved last and flattened into N = 3 * 2 = 6 features: the layer is
the same layer applied to x with those axes moved last and flattened (same alpha, same
running statistics after a step, same eval output), its training output is the op
``batch_inhib(x, alpha, axis=(1, 3))``, and NNX equals linen. Both sides run the same
float32 arithmetic on the same values, up to a transpose; the measured differences are
quoted beside each tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_batchinhib as jb
from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

X_SHAPE = (4, 3, 5, 2)  # features on axes 1 and 3: N = 6
AXES = (1, 3)
ROWS = jnp.arange(20).reshape(4, 5) % 3 > 0  # x's shape without the feature axes


def data(seed=0):
    return 1 + jax.random.normal(jax.random.key(seed), X_SHAPE)


def flat(a):
    """Feature axes (1, 3) moved last and flattened: (4, 5, 6)."""
    return jnp.moveaxis(a, AXES, (2, 3)).reshape(4, 5, 6)


CASES = {
    "plain": ({}, None),
    "rows_mask": ({}, ROWS),
    "keepdims_mask": ({}, ROWS[:, None, :, None]),
    "groups_cumulative": ({"groups": 2, "momentum": None}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linen_tuple_axis_is_flattened_last_axis(case):
    attrs, mask = CASES[case]
    attrs = {"momentum": 0.5, **attrs}
    x, x2 = data(0), data(1)
    mask_f = None if mask is None else (mask if mask.ndim == 2 else mask.reshape(4, 5, 1))
    tup = bnn.BatchInhib(axis=AXES, **attrs)
    one = bnn.BatchInhib(axis=-1, **attrs)
    vt = tup.init(jax.random.key(2), x, False, mask=mask)
    vo = one.init(jax.random.key(2), flat(x), False, mask=mask_f)
    assert jax.tree.map(jnp.shape, vt) == jax.tree.map(jnp.shape, vo)
    assert vt["params"]["alpha"].shape == ((6, 6) if "groups" not in attrs else (2, 3, 3))
    assert vt["batch_stats"]["mean"].shape == vt["batch_stats"]["var"].shape == (6,)
    np.testing.assert_array_equal(vt["params"]["alpha"], vo["params"]["alpha"])
    # a strong alpha (the initializer inhibits next to nothing)
    alpha = 0.5 * jax.random.normal(jax.random.key(3), vt["params"]["alpha"].shape)
    vt = {**vt, "params": {"alpha": alpha}}
    vo = {**vo, "params": {"alpha": alpha}}
    yt, ut = tup.apply(vt, x, False, mask=mask, mutable=["batch_stats"])
    yo, uo = one.apply(vo, flat(x), False, mask=mask_f, mutable=["batch_stats"])
    np.testing.assert_allclose(flat(yt), yo, rtol=0, atol=1e-6)  # measured 0 (same arithmetic)
    for k, v in uo["batch_stats"].items():
        np.testing.assert_allclose(ut["batch_stats"][k], v, rtol=1e-6, err_msg=k)  # measured 0
    assert not np.allclose(ut["batch_stats"]["cov"], vt["batch_stats"]["cov"])  # it moved
    # the op with the same tuple axis gives the training output
    y_op, _ = jb.batch_inhib(x, alpha, axis=AXES, mask=mask, groups=attrs.get("groups", 1))
    np.testing.assert_allclose(yt, y_op, rtol=0, atol=1e-6)  # measured 0
    # eval mode with the updated statistics, on another batch
    et = tup.apply({**vt, **ut}, x2, use_running_average=True)
    eo = one.apply({**vo, **uo}, flat(x2), use_running_average=True)
    np.testing.assert_allclose(flat(et), eo, rtol=0, atol=1e-6)  # measured 0
    assert not np.allclose(et, x2, atol=1e-2)  # eval inhibits: R != 0 after the update


def test_nnx_tuple_axis_equals_linen():
    x, x2 = data(0), data(1)
    lin = bnn.BatchInhib(axis=AXES, momentum=0.5)
    v = lin.init(jax.random.key(2), x, False)
    alpha = 0.5 * jax.random.normal(jax.random.key(3), (6, 6))
    v = {**v, "params": {"alpha": alpha}}
    y_l, upd = lin.apply(v, x, False, mask=ROWS, mutable=["batch_stats"])
    e_l = lin.apply({**v, **upd}, x2, use_running_average=True)

    mod = bnx.BatchInhib(6, axis=AXES, momentum=0.5, rngs=nnx.Rngs(0))
    assert mod.alpha[...].shape == (6, 6) and mod.mean[...].shape == (6,)
    mod.alpha[...] = alpha
    y_n = mod(x, mask=ROWS)
    np.testing.assert_allclose(y_n, y_l, rtol=0, atol=1e-6)  # measured 0
    for k in ("mean", "var", "cov"):
        np.testing.assert_allclose(getattr(mod, k)[...], upd["batch_stats"][k], rtol=1e-6)
    e_n = mod(x2, use_running_average=True)
    np.testing.assert_allclose(e_n, e_l, rtol=0, atol=1e-6)  # measured 0
    # gradients flow through the tuple-axis layer (the op's hand-derived VJP)
    g = jax.grad(lambda a: jnp.sum(jb.batch_inhib(x, a, axis=AXES)[0] ** 2))(alpha)
    g_l = jax.grad(
        lambda a: jnp.sum(
            lin.apply({**v, "params": {"alpha": a}}, x, False, mutable=["batch_stats"])[0] ** 2
        )
    )(alpha)
    np.testing.assert_allclose(g_l, g, rtol=1e-5, atol=1e-6)  # measured 0


def test_tuple_axis_errors_name_the_module():
    x = data()
    with pytest.raises(ValueError, match=r"BatchInhib: axis \(1, -3\) names the same axis twice"):
        bnn.BatchInhib(axis=(1, -3)).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"BatchInhib 'bi': axis \(3, 3\) names the same axis"):
        bnn.BatchInhib(axis=(3, 3), name="bi").init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"BatchInhib: axis \(1, -3\) names the same axis twice"):
        bnx.BatchInhib(6, axis=(1, -3), rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchInhib: x has 6 features on axis \(1, 3\)"):
        bnx.BatchInhib(3, axis=AXES, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchInhib: groups=4 must divide"):
        bnn.BatchInhib(axis=AXES, groups=4).init(jax.random.key(0), x, use_running_average=False)
