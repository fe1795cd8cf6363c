"""check_vjp itself, and the references it trusts: a wrong rule must fail, a right one
pass, and bad arguments get check_vjp's or the op's own message.

Each test here failed on the earlier check_vjp or reference: complex values compared
by their real parts, every output held to the first output's tolerance, NaN at masked
positions failing a correct op, ``axis=True`` sharing a compiled program with
``axis=1``, scalar hyperparameters traced, an input named ``output`` replacing the
forward's row, the reference's JAX error shown instead of the op's, argnums and keys
without a message, and a reference less accurate than the op at a large mean."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import VJPMismatch, check_vjp, tolerance


def _wrong_by(factor):
    """sin with a VJP off by ``factor`` (relative)."""

    @jax.custom_vjp
    def op(x):
        return jnp.sin(x)

    op.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x) * (1 + factor),))
    return op


def test_a_wrong_vjp_fails_and_a_right_one_passes():
    x = jnp.linspace(-2.0, 2.0, 12).reshape(4, 3)
    errs = check_vjp(_wrong_by(0.0), jnp.sin, x)
    assert errs["x"].max_rel < 1e-6, errs  # float32: the same arithmetic, measured 0
    with pytest.raises(VJPMismatch, match="check_vjp: op differs") as err:
        check_vjp(_wrong_by(1e-3), jnp.sin, x)
    assert err.value.errors["output"].ok and not err.value.errors["x"].ok


def test_complex_values_are_compared_as_complex():
    """A conjugated forward and VJP agree with z*z in their real parts only: both fail
    (they passed, the imaginary parts dropped with a ComplexWarning)."""
    z = (jnp.linspace(-1, 1, 6) + 1j * jnp.linspace(2, 0, 6)).astype(jnp.complex64)

    @jax.custom_vjp
    def op(z):
        return jnp.conj(z * z)

    op.defvjp(lambda z: (op(z), z), lambda z, g: (g * 2 * jnp.conj(z),))
    with pytest.raises(VJPMismatch) as err:
        check_vjp(op, lambda z: z * z, z)
    assert not err.value.errors["output"].ok and not err.value.errors["z"].ok
    right = jax.custom_vjp(lambda z: z * z)
    right.defvjp(lambda z: (z * z, z), lambda z, g: (g * 2 * z,))  # JAX's (no conjugate)
    assert check_vjp(right, lambda z: z * z, z)["z"].max_rel < 1e-6


def test_each_output_is_held_to_its_own_dtype():
    """bfloat16 x: y is bfloat16, the statistics float32. Statistics 1.2% off pass
    bfloat16's 1.6e-2 but not float32's 1e-4 (they passed)."""
    x = (1 + jax.random.normal(jax.random.key(1), (32, 4))).astype(jnp.bfloat16)

    def bad_bn(x):
        y, st = jb.batch_norm(x)
        return y, jb.BatchStats(st.mean, st.var + lax.stop_gradient(0.012 * st.var))

    errs = check_vjp(jb.batch_norm, ref.batch_norm, x)
    assert errs["output"].ok
    with pytest.raises(VJPMismatch) as err:
        check_vjp(bad_bn, ref.batch_norm, x)
    row = err.value.errors["output"]
    assert row.dtype == "float32" and row.tol == tolerance(jnp.float32), row


def test_nan_at_the_same_masked_positions_is_equal():
    """Masked rows may hold NaN; the op and the reference both return NaN there (the
    same formula on the raw values, a constant). That is agreement, not an error."""
    x = (3 + 2 * jax.random.normal(jax.random.key(1), (8, 3))).at[3].set(jnp.nan)
    mask = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    errs = check_vjp(jb.batch_norm, ref.batch_norm, x, mask=mask)
    assert errs["output"].max_rel < 1e-5, errs  # measured 2e-7
    # a NaN of ours where the reference is finite still fails
    nan_op = jax.custom_vjp(lambda x: jnp.where(x > 0, jnp.nan, x))
    nan_op.defvjp(lambda x: (nan_op(x), None), lambda _, g: (g,))
    with pytest.raises(VJPMismatch):
        check_vjp(nan_op, lambda x: x, jnp.linspace(-1.0, 1.0, 4))


def test_static_values_are_cached_with_their_types():
    """axis=True and axis=1 are equal in Python: the cached program of one served the
    other, so the op's refusal of True depended on the call order."""
    x = 1 + jax.random.normal(jax.random.key(1), (8, 3, 2))
    for first, second in ((1, True), (True, 1)):
        calls = []  # not a dict: 1 and True are the same key
        for axis in (first, second):
            try:
                check_vjp(jb.batch_norm, ref.batch_norm, x, axis=axis)
                calls.append((axis, "ok"))
            except TypeError as e:
                calls.append((axis, str(e)))
        for axis, got in calls:
            if axis is True:
                assert "axis must be an int or a tuple of ints; got True" in got, calls
            else:
                assert got == "ok", calls


def test_scalar_hyperparameters_stay_static():
    """epsilon=np.array(1e-3) or jnp.float32(1e-3), and a NumPy float rate given
    positionally, are what the ops accept called directly; check_vjp traced them."""
    x = jax.random.normal(jax.random.key(0), (8, 4))
    for eps in (np.array(1e-3), jnp.float32(1e-3)):
        assert check_vjp(jb.batch_norm, ref.batch_norm, x, epsilon=eps)["x"].ok
    errs = check_vjp(jb.dropout, ref.dropout, x, np.float32(0.5), jax.random.key(1))
    assert set(errs) == {"output", "x"}, errs


def test_an_input_named_output_keeps_the_forward_row():
    @jax.custom_vjp
    def op(output):
        return output * 3.0

    op.defvjp(lambda o: (o * 3.0, None), lambda _, g: (g * 2.0,))

    def reference(output):
        return output * 2.0

    with pytest.raises(VJPMismatch) as err:
        check_vjp(op, reference, jnp.linspace(-1.0, 1.0, 6))
    assert set(err.value.errors) == {"output", "output (arg 0)"}
    assert not err.value.errors["output"].ok


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((jnp.ones((8, 6)), jnp.ones(5)), {}, r"batch_norm: scale must have shape \(6,\)"),
        ((jnp.ones((8, 6)),), {"virtual_batch_size": 3}, "batch_norm: virtual_batch_size=3"),
        ((jnp.ones((0, 6)),), {}, "batch_norm: training-mode statistics need more than one"),
    ],
    ids=["scale_shape", "virtual_batch_size", "empty_batch"],
)
def test_bad_arguments_get_the_ops_message(args, kwargs, match):
    """The op is traced first: the reference's JAX reshape errors used to come out."""
    with pytest.raises(ValueError, match=match):
        check_vjp(jb.batch_norm, ref.batch_norm, *args, **kwargs)


def test_argnums_and_key_are_checked():
    x, s, b = jnp.ones((8, 3)), jnp.ones(3), jnp.zeros(3)
    x = x + jnp.arange(8.0)[:, None]
    assert set(check_vjp(jb.batch_norm, ref.batch_norm, x, s, b, argnums=0)) == {"output", "x"}
    assert set(check_vjp(jb.batch_norm, ref.batch_norm, x, s, b, argnums=(-1,))) == {
        "output",
        "bias",
    }
    with pytest.raises(ValueError, match="check_vjp: argnums entry 5 is out of range for 3"):
        check_vjp(jb.batch_norm, ref.batch_norm, x, s, b, argnums=(5,))
    with pytest.raises(TypeError, match="check_vjp: argnums must be an int or a sequence"):
        check_vjp(jb.batch_norm, ref.batch_norm, x, s, b, argnums="x")
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(TypeError, match="argnums entry 1 must name a floating array.*int32"):
        check_vjp(
            jb.softmax_cross_entropy_with_integer_labels,
            ref.softmax_cross_entropy_with_integer_labels,
            x,
            labels,
            argnums=(0, 1),
        )
    with pytest.raises(ValueError, match="check_vjp: no argument to differentiate"):
        check_vjp(jnp.sin, jnp.sin, 1.0)
    with pytest.raises(ValueError, match="check_vjp: op and reference must return the same"):
        check_vjp(lambda x: jb.batch_norm(x)[0], ref.batch_norm, x)
    assert check_vjp(jb.batch_norm, ref.batch_norm, x, key=np.int64(3))["x"].ok
    with pytest.raises(ValueError, match="check_vjp: key must be an int seed >= 0"):
        check_vjp(jb.batch_norm, ref.batch_norm, x, key=-1)


# ----------------------------------------------------------------------- the references


def _offset(shape, seed=0):
    """Mean 300, std 0.03: |mean| / std = 1e4, float32."""
    v = 300 + 0.03 * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(v, jnp.float32)


@pytest.mark.parametrize("name", ["batch_norm", "batch_center", "iter_norm"])
def test_reference_keeps_the_shift_at_a_large_mean(name):
    """The reference centres as (x - s) - mean_d, as the op: it computed x - (s + mean_d),
    which rounds the mean to x's scale (ulp(300) = 3e-5, 1e-3 of the std), and its y was
    400 times less accurate than the op's (2.9e-4 against 6.7e-7 for batch_norm), so
    check_vjp blamed a correct op. Both within float32 round-off of float64 now
    (measured 7e-7; 1e-5 is about ten float32 ulps of the outputs, up to 4)."""
    x = _offset((64, 4))
    with jax.enable_x64(True):
        want = np.asarray(getattr(ref, name)(jnp.asarray(np.asarray(x, np.float64)))[0])
    for f in (getattr(jb, name), getattr(ref, name)):
        err = np.max(np.abs(np.asarray(f(x)[0], np.float64) - want))
        assert err < 1e-5, (f, err)
    check_vjp(getattr(jb, name), getattr(ref, name), x)


def test_reference_reads_a_feature_mask_as_the_op():
    """A (N,) mask on x of shape (B, N), B != N, broadcasts to x (a feature mask), as in
    the op; the reference read any mask of x's rank minus one as rows and failed to
    broadcast it."""
    x = 2 + jax.random.normal(jax.random.key(5), (8, 4))
    m = jnp.array([1, 0, 1, 1], bool)
    yo, so = jb.batch_norm(x, mask=m)
    yr, sr = ref.batch_norm(x, mask=m)
    np.testing.assert_allclose(sr.mean, so.mean, rtol=1e-6)
    np.testing.assert_allclose(yr, yo, rtol=1e-5, atol=1e-6)
    check_vjp(jb.batch_norm, ref.batch_norm, x, mask=m)


def test_reference_batch_inhib_stays_in_float32_under_x64():
    """jnp.eye without a dtype made the float32 reference compute in float64 when x64 is
    on (27 float64 values in its jaxpr); it follows the input now, as the op."""

    def f64_values(f, *args):
        jaxpr = jax.make_jaxpr(f)(*args)
        return sum(
            1
            for e in jaxpr.jaxpr.eqns
            for v in e.outvars
            if getattr(v.aval, "dtype", None) == jnp.float64
        )

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (16, 4), jnp.float32)
        a = jnp.zeros((4, 4), jnp.float32)
        cov = jnp.eye(4, dtype=jnp.float32)
        assert f64_values(ref.batch_inhib, x, a) == 0
        assert f64_values(ref.batch_inhib_inference, x, a, cov) == 0


def test_reference_integer_labels_out_of_range_as_optax():
    """An out-of-range label: the loss is NaN in all three; the gradient of that row is
    g softmax(z) in the op and in optax, and was 0 in the reference."""
    z = jax.random.normal(jax.random.key(0), (2, 4))
    lab = jnp.array([1, 7])
    fs = (
        jb.softmax_cross_entropy_with_integer_labels,
        ref.softmax_cross_entropy_with_integer_labels,
        optax.softmax_cross_entropy_with_integer_labels,
    )
    grads = [jax.grad(lambda z, f=f: f(z, lab).sum())(z) for f in fs]
    for f in fs:
        assert np.isnan(np.asarray(f(z, lab))[1])
    np.testing.assert_allclose(grads[1], grads[2], rtol=1e-6)
    np.testing.assert_allclose(grads[0], grads[2], rtol=1e-6)
    np.testing.assert_allclose(grads[1][1], jax.nn.softmax(z[1]), rtol=1e-6)
