"""Error paths no other test exercises: each bad value is refused at trace time with the
exception type of ``tests/test_errors.py`` (TypeError: wrong type, bool as a number, a
tracer where a Python value is needed; ValueError: wrong value) and a message naming the
function and the argument. Already covered elsewhere, so not repeated here:
``batch_inhib`` rho=True, guard=0, groups not dividing N (``tests/test_errors.py``), a
bad correlation string (``tests/test_ops.py``), ``make_mesh(9)`` with 8 devices
(``tests/test_distributed.py``).

The last test runs an NNX model with ``BatchNorm(axis_name="data")`` under
``jax.shard_map`` over the 8 CPU devices (``tests/conftest.py``) for one training step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import nnx as bnx
from jax_batchinhib import parallel

N = 4
X = jax.random.normal(jax.random.key(0), (8, N))
ALPHA = jnp.zeros((N, N))
ONES, ZEROS = jnp.ones(N), jnp.zeros(N)

# (call, exception type, pattern naming the function and the argument)
CASES = {
    # dropout
    "dropout key None": (
        lambda: jb.dropout(X, 0.5, None),
        ValueError,
        r"dropout: key is required .*got None",
    ),
    "dropout key int": (
        lambda: jb.dropout(X, 0.5, 3),
        TypeError,
        r"dropout: key must be a PRNG key .*dtype int32",
    ),
    "dropout key float array": (
        lambda: jb.dropout(X, 0.5, jnp.ones(2)),
        TypeError,
        r"dropout: key must be a PRNG key .*dtype float32",
    ),
    "dropout traced rate": (
        lambda: jax.jit(lambda r: jb.dropout(X, r, jax.random.key(0)))(0.5),
        TypeError,
        r"dropout: rate must be a Python float known at trace time; got a tracer",
    ),
    # batch_inhib
    "batch_inhib rho=0": (
        lambda: jb.batch_inhib(X, ALPHA, rho=0),
        ValueError,
        r"batch_inhib: rho must be a finite float > 0; got 0",
    ),
    "batch_inhib rho=-1": (
        lambda: jb.batch_inhib(X, ALPHA, rho=-1),
        ValueError,
        r"batch_inhib: rho must be a finite float > 0; got -1",
    ),
    "batch_inhib rho=nan": (
        lambda: jb.batch_inhib(X, ALPHA, rho=float("nan")),
        ValueError,
        r"batch_inhib: rho must be a finite float > 0; got nan",
    ),
    "batch_inhib guard negative": (
        lambda: jb.batch_inhib(X, ALPHA, guard=-1e-3),
        ValueError,
        r"batch_inhib: guard must be a finite float > 0.*got -0.001",
    ),
    "batch_inhib guard=0.0 relative": (
        lambda: jb.batch_inhib(X, ALPHA, guard=0.0, guard_mode="relative"),
        ValueError,
        r"batch_inhib: guard must be a finite float > 0.*got 0.0",
    ),
    "batch_inhib groups=4 of N=6": (
        lambda: jb.batch_inhib(jnp.ones((8, 6)), jnp.zeros((6, 6)), groups=4),
        ValueError,
        r"batch_inhib: groups=4 must divide the number of features N=6",
    ),
    "batch_inhib denominator string": (
        lambda: jb.batch_inhib(X, ALPHA, denominator="sq"),
        ValueError,
        r"batch_inhib: denominator must be one of \('signed', 'abs'\); got 'sq'",
    ),
    "batch_inhib denominator not a string": (
        lambda: jb.batch_inhib(X, ALPHA, denominator=1),
        TypeError,
        r"batch_inhib: denominator must be one of \('signed', 'abs'\); got 1",
    ),
    "batch_inhib correlation not a string": (
        lambda: jb.batch_inhib(X, ALPHA, correlation=None),
        TypeError,
        r"batch_inhib: correlation must be one of \('pearson', 'variance'\); got None",
    ),
    # inference forms without their statistics
    "batch_norm_inference mean None": (
        lambda: jb.batch_norm_inference(X, ONES, ZEROS, None, ONES),
        ValueError,
        r"batch_norm_inference: mean and var are required",
    ),
    "batch_norm_inference var None": (
        lambda: jb.batch_norm_inference(X, ONES, ZEROS, ZEROS, None),
        ValueError,
        r"batch_norm_inference: mean and var are required",
    ),
    "batch_center_inference mean None": (
        lambda: jb.batch_center_inference(X, ZEROS, None),
        ValueError,
        r"batch_center_inference: mean is required",
    ),
    "batch_inhib_inference cov None": (
        lambda: jb.batch_inhib_inference(X, jnp.zeros((X.shape[-1],) * 2), None),
        ValueError,
        r"batch_inhib_inference: cov is required \(the running covariance\)",
    ),
    # scalar x
    "batch_norm scalar x": (
        lambda: jb.batch_norm(jnp.float32(1.0)),
        ValueError,
        r"batch_norm: x must have at least one dimension; got a scalar",
    ),
    "batch_center scalar x": (
        lambda: jb.batch_center(jnp.float32(1.0)),
        ValueError,
        r"batch_center: x must have at least one dimension; got a scalar",
    ),
    "batch_inhib scalar x": (
        lambda: jb.batch_inhib(jnp.float32(1.0), ALPHA),
        ValueError,
        r"batch_inhib: x must have at least one dimension; got a scalar",
    ),
    # float masks (integer 0/1 masks are accepted by design, ``ops/_checks.py``)
    "batch_norm float mask": (
        lambda: jb.batch_norm(X, mask=jnp.ones((8, N))),
        TypeError,
        r"batch_norm: mask must be a boolean array \(or integer 0/1\); got dtype float32",
    ),
    "batch_inhib float row mask": (
        lambda: jb.batch_inhib(X, ALPHA, mask=jnp.ones(8)),
        TypeError,
        r"batch_inhib: mask must be a boolean array \(or integer 0/1\); got dtype float32",
    ),
    # softmax_cross_entropy
    "softmax_cross_entropy labels (8, 3)": (
        lambda: jb.softmax_cross_entropy(X, jnp.ones((8, 3)) / 3),
        ValueError,
        r"softmax_cross_entropy: labels must have the shape of logits \(8, 4\); got \(8, 3\)",
    ),
    "softmax_cross_entropy labels (4,)": (
        lambda: jb.softmax_cross_entropy(X, jnp.ones(4) / 4),
        ValueError,
        r"softmax_cross_entropy: labels must have the shape of logits \(8, 4\); got \(4,\)",
    ),
    # parallel
    "make_mesh 0": (
        lambda: parallel.make_mesh(0),
        ValueError,
        r"make_mesh: n_devices must be an int >= 1; got 0",
    ),
    "make_mesh -1": (
        lambda: parallel.make_mesh(-1),
        ValueError,
        r"make_mesh: n_devices must be an int >= 1; got -1",
    ),
    "set_cpu_device_count 0": (
        lambda: parallel.set_cpu_device_count(0),
        ValueError,
        r"set_cpu_device_count: n must be an int >= 1; got 0",
    ),
    "shard_batch indivisible": (
        lambda: parallel.shard_batch({"x": jnp.ones((6, N))}, parallel.make_mesh(8)),
        ValueError,
        r"shard_batch: the batch axis 0 of an array of shape \(6, 4\) must split evenly "
        r"over 8 devices",
    ),
    "shard_batch batch_axis beyond ndim": (
        lambda: parallel.shard_batch(jnp.ones(8), parallel.make_mesh(8), batch_axis=1),
        ValueError,
        r"shard_batch: an array of shape \(8,\) has no batch axis 1 to split over 8 devices",
    ),
    "shard_map_step indivisible": (
        lambda: parallel.shard_map_step(lambda s, x, y: (s, jnp.sum(x)), parallel.make_mesh(8))(
            jnp.zeros(()), jnp.ones((6, N)), jnp.ones(6)
        ),
        ValueError,
        r"shard_map_step: the batch axis 0 of an array of shape \(6, 4\) must split evenly "
        r"over 8 devices",
    ),
    # a batch of no rows: masked, mapped or split into ghost batches it failed inside JAX
    # (argmax of an empty sequence, a slice past the end) or gave NaN statistics
    "batch_norm no rows masked": (
        lambda: jb.batch_norm(X[:0], mask=jnp.zeros((0,), bool)),
        ValueError,
        r"batch_norm: training-mode statistics need more than one value per feature; got x "
        r"of shape \(0, 4\), which has 0 values",
    ),
    "batch_inhib no rows under vmap axis_name": (
        lambda: jax.vmap(lambda x: jb.batch_inhib(x, ALPHA, axis_name="i"), axis_name="i")(
            jnp.zeros((2, 0, N))
        ),
        ValueError,
        r"batch_inhib: training-mode statistics need more than one value per feature; got x "
        r"of shape \(0, 4\)",
    ),
    "batch_center no rows ghost batches": (
        lambda: jb.batch_center(X[:0], virtual_batch_size=2),
        ValueError,
        r"batch_center: virtual_batch_size=2 splits the leading axis into sub-batches, but x "
        r"of shape \(0, 4\) has no rows",
    ),
    # no features: a covariance of 0 x 0 failed in a reshape (ZeroDivisionError) or named
    # alpha_shape
    "iter_norm no features": (
        lambda: jb.iter_norm(X[:, :0]),
        ValueError,
        r"iter_norm: x must have at least one feature; got x of shape \(8, 0\)",
    ),
    "zca_norm_inference no features": (
        lambda: jb.zca_norm_inference(X[:, :0], None, None, jnp.zeros(0), jnp.zeros((0, 0))),
        ValueError,
        r"zca_norm_inference: x must have at least one feature",
    ),
    "batch_inhib no features": (
        lambda: jb.batch_inhib(X[:, :0], jnp.zeros((0, 0))),
        ValueError,
        r"batch_inhib: x must have at least one feature",
    ),
    # lists: JAX's "Cannot determine dtype of [...]" named neither function nor argument
    "batch_norm mask list": (
        lambda: jb.batch_norm(X, mask=[True] * 8),
        TypeError,
        r"batch_norm: mask must be an array \(a jax.Array or numpy.ndarray\); got list",
    ),
    "batch_inhib alpha list": (
        lambda: jb.batch_inhib(X, [[0.0] * N] * N),
        TypeError,
        r"batch_inhib: alpha must be an array .*got list",
    ),
    "softmax_cross_entropy labels list": (
        lambda: jb.softmax_cross_entropy(X, [[0.0] * N] * 8),
        TypeError,
        r"softmax_cross_entropy: labels must be an array .*got list",
    ),
    # mode flags: "False" meant True; a traced flag failed in Python's bool()
    "nnx Dropout deterministic string": (
        lambda: bnx.Dropout(0.5, rngs=nnx.Rngs(0))(X, deterministic="False"),
        TypeError,
        r"Dropout: deterministic must be a bool \(True or False\); got 'False'",
    ),
    "nnx BatchNorm use_running_average traced": (
        lambda: jax.jit(lambda x, u: bnx.BatchNorm(N, rngs=nnx.Rngs(0))(x, use_running_average=u))(
            X, True
        ),
        TypeError,
        r"BatchNorm: use_running_average must be a bool known at trace time",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_is_refused_by_name(case):
    call, exc, pattern = CASES[case]
    with pytest.raises(exc, match=pattern) as info:
        call()
    assert type(info.value) is exc  # not a subclass (e.g. JAX's own errors)


@pytest.mark.parametrize("bad", [True, 2.0])
def test_make_mesh_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match=r"make_mesh: n_devices must be an int >= 1"):
        parallel.make_mesh(bad)


def test_data_parallel_indivisible_batch_is_refused_by_name():
    step = parallel.data_parallel(lambda s, x, y: (s, jnp.sum(x)), parallel.make_mesh(8))
    with pytest.raises(ValueError, match=r"data_parallel: the batch axis 0 .*\(6, 4\)"):
        step(jnp.zeros(()), jnp.ones((6, N)), jnp.ones(6))


# ------------------------------------------------- NNX BatchNorm under shard_map

ND, B, F_IN, F = 8, 32, 5, 4


class _Net(nnx.Module):
    def __init__(self, axis_name, rngs):
        self.linear = nnx.Linear(F_IN, F, rngs=rngs)
        self.bn = bnx.BatchNorm(F, momentum=0.9, axis_name=axis_name, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


def _step(graphdef, params, stats, x, ct):
    """One training step: output, updated running statistics, d(sum(y * ct))/dparams."""

    model = nnx.merge(graphdef, params, stats)

    def loss(model):
        y = model(x)
        return jnp.sum(y * ct), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    new_stats = nnx.state(model, nnx.BatchStat)
    return y, new_stats, grads


def test_nnx_batch_norm_under_shard_map_equals_full_batch():
    """An NNX model (Linear, then BatchNorm(axis_name="data")) under jax.shard_map over 8
    devices, 4 examples each: its output, running mean/var and parameter gradients after
    one training step equal the same model (axis_name=None) on the 32-example batch on
    one device. The sum loss is the sum of the per-device sums; under check_vma the
    gradients of the replicated parameters come out summed over the devices."""
    x = jax.random.normal(jax.random.key(1), (B, F_IN)) * 2.0 + 1.0
    ct = jax.random.normal(jax.random.key(2), (B, F))
    single = _Net(None, nnx.Rngs(0))
    synced = _Net("data", nnx.Rngs(0))
    gd1, params1, stats1 = nnx.split(single, nnx.Param, nnx.BatchStat)
    gd8, params8, stats8 = nnx.split(synced, nnx.Param, nnx.BatchStat)
    # same initial values (same Rngs seed)
    jax.tree.map(np.testing.assert_array_equal, params1, params8)

    want = jax.jit(lambda p, s, x, ct: _step(gd1, p, s, x, ct))(params1, stats1, x, ct)
    f = jax.shard_map(
        lambda p, s, x, ct: _step(gd8, p, s, x, ct),
        mesh=parallel.make_mesh(ND),
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P("data"), P(), P()),
    )
    got = jax.jit(f)(params8, stats8, x, ct)

    # the running statistics moved (the test would pass vacuously at their init)
    assert not np.allclose(want[1]["bn"]["mean"][...], 0.0)
    # float32; values up to 14, each a sum over 32 examples taken in another order
    # (8 partial sums, then a psum). Measured max abs difference per leaf: y 4.8e-7,
    # mean 7.5e-9, var 1.2e-7, d bn.bias 7.2e-7, d bn.scale 9.5e-7, d linear.kernel
    # 1.4e-6, d linear.bias 4.2e-7 (zero in exact arithmetic: BatchNorm removes the mean,
    # so only round-off is left and atol covers it). The tolerances sit near 10x those.
    # With axis_name=None in the sharded model (per-device statistics) the test fails.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=4e-6)


# ------------------------------------------------- batch_inhib: epsilon must be > 0


@pytest.mark.parametrize("correlation", ["pearson", "variance"])
def test_batch_inhib_refuses_epsilon_zero(correlation):
    """A feature constant over the batch has var = 0, and with epsilon = 0 the correlation
    divides 0 by 0: every output and gradient was NaN, silently, for both correlations
    (s = sqrt(var + eps) or var + eps). epsilon <= 0 is refused by name, as iter_norm and
    zca_norm refuse it, and by the linen and NNX modules under their own name (NNX when
    constructed), also with use_autodiff=True, where the reference (no check) runs. A
    small positive epsilon keeps everything finite."""
    from jax_batchinhib import linen as bnn

    x = X.at[:, 1].set(2.0)  # feature 1 constant
    kw = dict(correlation=correlation)
    for bad in (0.0, 0, -1e-3, float("inf")):
        with pytest.raises(
            ValueError,
            match=rf"^batch_inhib: epsilon must be > 0 and finite \(it keeps the correlation's "
            rf"denominator.*\); got {bad!r}$",
        ):
            jb.batch_inhib(x, ALPHA, epsilon=bad, **kw)
    with pytest.raises(TypeError, match=r"batch_inhib: epsilon must be a finite float"):
        jb.batch_inhib(x, ALPHA, epsilon=True, **kw)
    module_msg = r"^BatchInhib: epsilon must be > 0 and finite \(.*\); got "
    for bad in (0.0, -1.0):
        for autodiff in (False, True):
            with pytest.raises(ValueError, match=module_msg + repr(bad)):
                bnn.BatchInhib(
                    use_running_average=False, epsilon=bad, use_autodiff=autodiff, **kw
                ).init(jax.random.key(1), x)
            with pytest.raises(ValueError, match=module_msg + repr(bad)):
                bnx.BatchInhib(N, epsilon=bad, use_autodiff=autodiff, rngs=nnx.Rngs(0), **kw)

    def loss(x):
        return jnp.sum(jb.batch_inhib(x, ALPHA, epsilon=1e-12, **kw)[0])

    y, g = jax.value_and_grad(loss)(x)
    assert np.isfinite(y) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["IterNorm", "ZCANorm"])
def test_whitening_modules_say_epsilon_greater_than_zero(name):
    """The modules refused a negative epsilon with ">= 0" although 0 is refused too."""
    from jax_batchinhib import linen as bnn

    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^{name}: epsilon must be .*> 0") as e:
            getattr(bnn, name)(use_running_average=False, epsilon=bad).init(jax.random.key(1), X)
        assert ">= 0" not in str(e.value)
        with pytest.raises(ValueError, match=rf"^{name}: epsilon must be .*> 0") as e:
            getattr(bnx, name)(N, epsilon=bad, rngs=nnx.Rngs(0))
        assert ">= 0" not in str(e.value)


def test_hyperparameters_may_be_concrete_jax_scalars():
    """flax accepts momentum=jnp.float32(0.9); ours refused it with 'must be a float in
    [0, 1]' (0.9 is). Concrete 0-d arrays count as numbers; a traced one is still a clear
    TypeError (a hyperparameter is known at trace time) and a bool array still refused."""
    from jax_batchinhib import linen as bnn

    mdl = bnn.BatchNorm(
        use_running_average=False, momentum=jnp.float32(0.9), epsilon=jnp.float32(1e-3)
    )
    v = mdl.init(jax.random.key(0), X)
    _, upd = mdl.apply(v, X, mutable=["batch_stats"])
    want = bnn.BatchNorm(  # the values the float32 scalars hold
        use_running_average=False,
        momentum=float(jnp.float32(0.9)),
        epsilon=float(jnp.float32(1e-3)),
    )
    _, upd_want = want.apply(v, X, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_want), strict=True):
        np.testing.assert_array_equal(a, b)
    bnx.BatchNorm(N, momentum=jnp.float32(0.9), rngs=nnx.Rngs(0))(X)
    jb.dropout(X, jnp.float32(0.5), jax.random.key(0))
    with pytest.raises(ValueError, match=r"^batch_inhib: epsilon must be > 0 and finite"):
        jb.batch_inhib(X, ALPHA, epsilon=jnp.float32(0.0))  # the value still checked
    with pytest.raises(TypeError, match=r"batch_norm: epsilon must be .*; got a tracer"):
        jax.jit(lambda e: jb.batch_norm(X, epsilon=e))(1e-3)
    with pytest.raises(TypeError, match=r"batch_norm: epsilon must be a finite float"):
        jb.batch_norm(X, epsilon=jnp.bool_(True))


def test_a_training_batch_of_one_names_the_module():
    """The error came from the op ('batch_norm: ...'), so a model could not tell which
    layer failed, and it suggested the op's inference form; it names the module (with
    its flax name) and says use_running_average=True."""
    import flax.linen as nn

    from jax_batchinhib import linen as bnn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return bnn.BatchNorm(use_running_average=False, name="bn1")(x)

    v = Net().init(jax.random.key(0), X)
    msg = r"need more than one value per feature; got x of shape \(1, 4\).*use_running_average=True"
    with pytest.raises(ValueError, match=r"^BatchNorm 'bn1': training-mode statistics " + msg):
        Net().apply(v, X[:1], mutable=["batch_stats"])
    for name in ("BatchCenter", "BatchInhib", "IterNorm", "ZCANorm"):
        with pytest.raises(ValueError, match=rf"^{name}: training-mode statistics " + msg):
            getattr(bnx, name)(N, rngs=nnx.Rngs(0))(X[:1])


def test_an_empty_training_batch_says_zero_values_per_feature():
    """The message said 'one value per feature' for a batch of none."""
    from jax_batchinhib import linen as bnn

    m = bnn.BatchNorm(use_running_average=False)
    v = m.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"got x of shape \(0, 4\), 0 values per feature"):
        m.apply(v, X[:0], mutable=["batch_stats"])


_BAD_ATTRIBUTES = [
    (dict(unbiased="False"), TypeError, r"unbiased must be a bool \(True or False\); got 'False'"),
    (dict(use_scale="no"), TypeError, r"use_scale must be a bool"),
    (dict(use_autodiff=1), TypeError, r"use_autodiff must be a bool"),
    (dict(force_float32_reductions=None), TypeError, r"force_float32_reductions must be a bool"),
    (
        dict(dtype=jnp.int32),
        TypeError,
        r"dtype must be a floating-point dtype .* or None; got int32",
    ),
    (dict(dtype="foo"), TypeError, r"dtype must be a floating-point dtype .*; got 'foo'"),
    (dict(param_dtype=jnp.int32), TypeError, r"param_dtype must be a floating-point dtype"),
    (dict(scale_init=3.0), TypeError, r"scale_init must be an initializer, a callable"),
    (dict(bias_init=None), TypeError, r"bias_init must be an initializer, a callable"),
]


@pytest.mark.parametrize("family", ["linen", "nnx"])
@pytest.mark.parametrize("attrs, error, message", _BAD_ATTRIBUTES)
def test_module_attributes_are_checked_by_name(family, attrs, error, message):
    """unbiased='False' meant True; dtype=int32 truncated the output to -1/0/1 (linen, as
    flax.linen) or failed in flax's promote_dtype (NNX); a non-callable initializer was
    Python's "'float' object is not callable". Each is now the module's error."""
    from jax_batchinhib import linen as bnn

    with pytest.raises(error, match=rf"^BatchNorm: {message}"):
        if family == "linen":
            bnn.BatchNorm(use_running_average=False, **attrs).init(jax.random.key(0), X)
        else:
            bnx.BatchNorm(N, rngs=nnx.Rngs(0), **attrs)(X)


def test_nnx_attributes_changed_after_construction_are_checked():
    """bn.momentum = 5.0 after construction was used unchecked: the running variance went
    negative and eval returned NaN. Changed attributes are checked at every call, with
    the module's name (epsilon's error named the op)."""
    for attr, value, message in (
        ("momentum", 5.0, r"momentum must be a float in \[0, 1\] or None"),
        ("epsilon", -1.0, r"epsilon must be a finite float >= 0"),
        ("unbiased", "no", r"unbiased must be a bool"),
        ("momentum", None, r"momentum was changed between a float and None after construction"),
    ):
        bn = bnx.BatchNorm(N, rngs=nnx.Rngs(0))
        setattr(bn, attr, value)
        with pytest.raises((TypeError, ValueError), match=rf"^BatchNorm: {message}"):
            bn(X)
    for cls in ("BatchInhib", "ZCANorm"):
        m = getattr(bnx, cls)(N, rngs=nnx.Rngs(0))
        m.momentum = 1.5
        with pytest.raises(ValueError, match=rf"^{cls}: momentum must be a float"):
            m(X)
    bn = bnx.BatchNorm(N, rngs=nnx.Rngs(0))
    bn.momentum = 0.5  # a valid change is used
    bn(X)
    # float32 means of 8 values of O(1), summed in another order: a few ulps of 1
    np.testing.assert_allclose(bn.mean[...], 0.5 * jnp.mean(X, axis=0), rtol=0, atol=1e-6)
