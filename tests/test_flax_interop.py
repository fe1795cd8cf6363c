"""NNX models move both ways between flax.nnx.BatchNorm and ours (``unbiased=False``).

The state of a model holding :class:`flax.nnx.BatchNorm` and the state of the same model
holding :class:`jax_batchinhib.nnx.BatchNorm` have the same names, shapes and dtypes, so
a model trained with one restores into the other (``nnx.split`` / ``nnx.merge``, or
``nnx.to_pure_dict`` / ``nnx.replace_by_pure_dict``) with nothing lost: the restored
state is bitwise the saved one, and the eval outputs agree.

Tolerances (float32): eval mode is ``(x - mean) / sqrt(var + eps) * scale + bias`` in
both modules on the same stored values, written in different orders: outputs of O(1)
agree to a few ulps (measured max abs difference 1.8e-7 on these models; 1e-6 used). A
training step after the restore goes through each module's own variance computation
(flax's ``use_fast_variance=False`` two-pass vs ours shifted two-pass): measured 4.8e-7
at most (a running variance of O(1)); 1e-5 used, as in tests/test_linen.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_batchinhib as jbi
from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

EVAL_ATOL = 1e-6  # float32 eval outputs of O(1) (measured 1.8e-7)
TRAIN_ATOL = 1e-5  # float32, one step through two variance computations (4.8e-7)


def ours(n, **kw):
    return bnx.BatchNorm(n, unbiased=False, **kw)


def theirs(n, **kw):
    return nnx.BatchNorm(n, use_fast_variance=False, **kw)


NORMS = {"ours": ours, "flax": theirs}


class Net(nnx.Module):
    """Dense -> BatchNorm -> relu -> Dense -> BatchNorm (NHWC-like 3-D input) -> Dense."""

    def __init__(self, norm, *, rngs, **kw):
        self.lin1 = nnx.Linear(3, 6, rngs=rngs)
        self.bn1 = norm(6, momentum=0.8, rngs=rngs, **kw)
        self.lin2 = nnx.Linear(6, 4, rngs=rngs)
        self.bn2 = norm(4, momentum=0.9, rngs=rngs, **kw)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):  # x: (batch, positions, 3)
        h = nnx.relu(self.bn1(self.lin1(x)))
        h = nnx.relu(self.bn2(self.lin2(h)))
        return self.out(h).mean(axis=1)


def data(k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * k)
    xs = [1.0 + 2.0 * jax.random.normal(keys[i], (6, 3, 3)) for i in range(k)]
    ts = [jax.random.normal(keys[k + i], (6, 2)) for i in range(k)]
    return xs, ts


@nnx.jit
def train_step(model, opt, x, t):
    def loss(m):
        return jnp.mean((m(x) - t) ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value


@nnx.jit
def eval_out(model, x):
    return nnx.view(model, use_running_average=True)(x)


@functools.cache
def _trained(kind, steps):
    model = Net(NORMS[kind], rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    xs, ts = data(steps)
    for x, t in zip(xs, ts, strict=True):
        train_step(model, opt, x, t)
    return model


def trained(kind, steps=3):
    """A fresh copy of a model of ``kind`` trained ``steps`` Adam steps (shared)."""
    return nnx.clone(_trained(kind, steps))


def spec(state):
    return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(state))


@pytest.mark.parametrize(
    "kw",
    [{}, {"use_scale": False}, {"use_bias": False}, {"param_dtype": jnp.bfloat16}],
    ids=["default", "no_scale", "no_bias", "param_bf16"],
)
def test_same_state_names_shapes_dtypes_and_initial_values(kw):
    """(With ``param_dtype=float64`` ours keeps float64 statistics where flax keeps
    float32: names and shapes agree, dtypes do not; see running.stats_dtype.)"""
    a, b = Net(ours, rngs=nnx.Rngs(0), **kw), Net(theirs, rngs=nnx.Rngs(0), **kw)
    sa, sb = nnx.state(a), nnx.state(b)
    assert spec(sa) == spec(sb)
    # the same variable types under the same paths (Param vs BatchStat matter to
    # filters such as nnx.Optimizer(wrt=nnx.Param))
    ta = {p: type(v) for p, v in nnx.to_flat_state(sa)}
    tb = {p: type(v) for p, v in nnx.to_flat_state(sb)}
    assert ta == tb
    # same rngs -> the same initial values
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(sa), nnx.to_pure_dict(sb))


@pytest.mark.parametrize("src,dst", [("flax", "ours"), ("ours", "flax")])
def test_trained_state_restores_into_the_other_module(src, dst):
    """Train 3 Adam steps with ``src``, nnx.split, nnx.merge into a ``dst`` model's
    graphdef: bitwise the same state, the same eval outputs; one more training step
    from there agrees between the restored model and the original."""
    model = trained(src)
    _, state = nnx.split(model)
    state = nnx.clone(state)  # a copy: merge would otherwise share the Variables
    graphdef_dst, _ = nnx.split(Net(NORMS[dst], rngs=nnx.Rngs(1)))
    restored = nnx.merge(graphdef_dst, state)
    assert type(restored.bn1) is not type(model.bn1)
    assert restored.bn1.mean is not model.bn1.mean
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(restored)),
        nnx.to_pure_dict(state),
    )
    # the statistics were trained (not the initial zeros/ones)
    assert float(jnp.abs(state["bn1"]["mean"][...]).max()) > 0.1
    xs, ts = data(2, seed=7)
    for x in xs:
        np.testing.assert_allclose(eval_out(restored, x), eval_out(model, x), atol=EVAL_ATOL)
    # training continues in both from the same state
    for m in (model, restored):
        opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
        train_step(m, opt, xs[0], ts[0])
    jax.tree.map(
        lambda p, q: np.testing.assert_allclose(p, q, atol=TRAIN_ATOL, rtol=1e-5),
        nnx.to_pure_dict(nnx.state(restored)),
        nnx.to_pure_dict(nnx.state(model)),
    )


@pytest.mark.parametrize("src,dst", [("flax", "ours"), ("ours", "flax")])
def test_pure_dict_checkpoint_moves_both_ways(src, dst):
    """The pure-dict route (what a checkpoint file holds): nnx.to_pure_dict of one,
    nnx.replace_by_pure_dict + nnx.update into a fresh model of the other."""
    model = trained(src)
    saved = nnx.to_pure_dict(nnx.state(model))
    fresh = Net(NORMS[dst], rngs=nnx.Rngs(5))
    st = nnx.state(fresh)
    nnx.replace_by_pure_dict(st, saved)
    nnx.update(fresh, st)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(fresh)), saved)
    x = data(1, seed=3)[0][0]
    np.testing.assert_allclose(eval_out(fresh, x), eval_out(model, x), atol=EVAL_ATOL)


def test_momentum_none_state_does_not_fit_flax():
    """With ``momentum=None`` ours keeps an extra ``count`` statistic: its state is a
    superset of flax's, so restoring it into flax's module fails loudly rather than
    dropping the count."""
    a = Net(ours, rngs=nnx.Rngs(0))
    b = bnx.BatchNorm(6, momentum=None, unbiased=False, rngs=nnx.Rngs(0))
    assert set(nnx.to_pure_dict(nnx.state(b))) == {"mean", "var", "count", "scale", "bias"}
    assert set(nnx.to_pure_dict(nnx.state(a.bn1))) == {"mean", "var", "scale", "bias"}
    flx = theirs(6, rngs=nnx.Rngs(0))
    st = nnx.state(flx)
    with pytest.raises(Exception, match="count"):
        nnx.replace_by_pure_dict(st, nnx.to_pure_dict(nnx.state(b)))


# --------------------------------------------------- flax.nnx options: promote_dtype, metadata

BF16_TOL = 2.0**-7  # two bfloat16 ulps relative (measured: one ulp, 0.0156 at |y| ~ 3)


def _spy(log, inner):
    def promote(args, /, *, dtype=None, **kw):
        log.append(([None if a is None else (a.shape, a.dtype) for a in args], dtype))
        return inner(args, dtype=dtype, **kw)

    return promote


def _identity(args, **kw):  # what flax's own NNX-vs-linen equivalence test passes
    return args


@pytest.mark.parametrize("promote", ["default", "identity"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["dtype_none", "dtype_bf16"])
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=["x_f32", "x_bf16"])
def test_promote_dtype_like_flax_nnx_batchnorm(promote, dtype, xdtype):
    """promote_dtype receives the same tuple (x, mean, var, scale, bias) with the same
    dtype keyword as in flax.nnx.BatchNorm, and the outputs (training and eval mode),
    their dtypes and the running statistics agree."""
    inner = {"default": nnx.nn.dtypes.promote_dtype, "identity": _identity}[promote]
    x = (1.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 3, 5))).astype(xdtype)
    log_o, log_f = [], []
    common = dict(momentum=0.5, dtype=dtype, rngs=nnx.Rngs(0))
    o = ours(5, promote_dtype=_spy(log_o, inner), **common)
    f = theirs(5, promote_dtype=_spy(log_f, inner), **common)
    outs = [(m(x), m(x, use_running_average=True)) for m in (o, f)]
    assert log_o == log_f and len(log_o) == 2
    narrow = jnp.bfloat16 in (dtype, xdtype)
    for a, b in zip(*outs, strict=True):
        assert a.dtype == b.dtype
        tol = BF16_TOL if a.dtype == jnp.bfloat16 else EVAL_ATOL
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
        )
    jax.tree.map(
        lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6 if narrow else 0),
        nnx.to_pure_dict(nnx.state(o, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(f, nnx.BatchStat)),
    )


@pytest.mark.parametrize("cls", ["BatchNorm", "BatchInhib", "ZCANorm"])
def test_eval_in_float16_does_not_narrow_the_statistics(cls):
    """dtype=float16 with a feature variance above 65504 (std 300): eval mode cast the
    running statistics to float16, where they are inf: BatchInhib returned NaN (and
    flax.nnx.BatchNorm returns 0 for such a feature). Eval now uses them as stored
    (float32), and with momentum 0 it reproduces the training output of the same batch."""
    x = (300.0 * jax.random.normal(jax.random.key(0), (64, 4))).astype(jnp.float16)
    extra = {"BatchNorm": dict(unbiased=False)}.get(cls, {})  # the batch's own variance
    m = getattr(bnx, cls)(4, dtype=jnp.float16, momentum=0.0, rngs=nnx.Rngs(0), **extra)
    if cls == "BatchInhib":
        m.alpha[...] = jnp.zeros_like(m.alpha[...])  # full strength, so the covariance acts
    y_train = m(x)
    y_eval = m(x, use_running_average=True)
    assert y_train.dtype == y_eval.dtype == jnp.float16
    assert bool(jnp.isfinite(y_eval).all())
    # two float16 roundings of float32 values that agree to float32 round-off: at most one
    # float16 ulp, 2**-10 of the largest output (measured: 0, and 5e-4 ulp for BatchInhib)
    tol = 2.0**-10 * float(jnp.abs(y_train.astype(jnp.float32)).max())
    np.testing.assert_allclose(
        np.asarray(y_eval, np.float32), np.asarray(y_train, np.float32), atol=tol, rtol=0
    )
    if cls == "BatchNorm":  # flax.nnx narrows: its eval loses the large features
        f = nnx.BatchNorm(4, dtype=jnp.float16, momentum=0.0, rngs=nnx.Rngs(0))
        f(x)
        y_flax = np.asarray(f(x, use_running_average=True), np.float32)
        assert np.abs(y_flax - np.asarray(y_train, np.float32)).max() > 1.0


def test_promote_dtype_of_our_other_layers():
    """BatchCenter and BatchInhib call promote_dtype on (x, mean[, var, cov], params):
    a promote_dtype that casts to bfloat16 makes a bfloat16 output and a float32 update
    of the statistics."""
    x = 1.0 + jax.random.normal(jax.random.key(1), (8, 4))
    for cls, names in (
        (bnx.BatchCenter, [(8, 4), (4,), (4,)]),
        (bnx.BatchInhib, [(8, 4), (4,), (4,), (4, 4), (4, 4)]),
    ):
        log = []
        m = cls(4, dtype=jnp.bfloat16, promote_dtype=_spy(log, nnx.nn.dtypes.promote_dtype),
                rngs=nnx.Rngs(0))  # fmt: skip
        y = m(x)
        assert [s for s, _ in log[0][0]] == names and log[0][1] == jnp.bfloat16
        assert y.dtype == jnp.bfloat16 and m.mean[...].dtype == jnp.float32
        assert float(jnp.abs(m.mean[...]).max()) > 0  # the statistics were updated
        assert m(x, use_running_average=True).dtype == jnp.bfloat16


def test_param_metadata_like_flax_nnx_batchnorm():
    """scale_metadata / bias_metadata reach nnx.Param as in flax (here sharding
    annotations on a 2-device mesh: the same metadata, partition specs and shardings);
    BatchCenter's bias_metadata, BatchInhib's alpha_metadata and the whitening modules'
    scale_metadata / bias_metadata likewise."""
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    md = dict(scale_metadata={"out_sharding": ("model",)}, bias_metadata={"out_sharding": (None,)})
    with jax.set_mesh(mesh):
        o, f = ours(4, rngs=nnx.Rngs(0), **md), theirs(4, rngs=nnx.Rngs(0), **md)
        c = bnx.BatchCenter(4, bias_metadata={"out_sharding": ("model",)}, rngs=nnx.Rngs(0))
        i = bnx.BatchInhib(4, alpha_metadata={"out_sharding": ("model", None)}, rngs=nnx.Rngs(0))
        whiten = [cls(4, rngs=nnx.Rngs(0), **md) for cls in (bnx.IterNorm, bnx.ZCANorm)]
    for w in whiten:
        assert w.scale[...].sharding.spec == jax.sharding.PartitionSpec("model")
        assert w.bias.get_metadata()["out_sharding"] == (None,)
    for name in ("scale", "bias"):
        po, pf = getattr(o, name), getattr(f, name)
        assert po.get_metadata() == pf.get_metadata()
        assert po[...].sharding == pf[...].sharding
    assert o.scale[...].sharding.spec == jax.sharding.PartitionSpec("model")
    assert nnx.get_partition_spec(nnx.state(o, nnx.Param)) == nnx.get_partition_spec(
        nnx.state(f, nnx.Param)
    )
    assert c.bias[...].sharding.spec == jax.sharding.PartitionSpec("model")
    assert i.alpha[...].sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert i.alpha.get_metadata()["out_sharding"] == ("model", None)


def test_promote_dtype_and_metadata_errors():
    x = jnp.ones((8, 4))
    with pytest.raises(TypeError, match=r"BatchNorm: promote_dtype must be a callable .* got 3"):
        ours(4, promote_dtype=3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"BatchInhib: promote_dtype must be a callable"):
        bnx.BatchInhib(4, promote_dtype="float32", rngs=nnx.Rngs(0))
    bad_len = ours(4, promote_dtype=lambda a, **kw: a[:2], rngs=nnx.Rngs(0))
    msg = r"BatchNorm: promote_dtype must return a tuple of 5 values \(x, mean, var, scale, bias\)"
    with pytest.raises(TypeError, match=msg + r".* got a tuple of length 2"):
        bad_len(x)
    bad_shape = ours(4, promote_dtype=lambda a, **kw: (a[0][:1], *a[1:]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"BatchNorm: .* x has shape \(8, 4\) but came back "
                       r"with shape \(1, 4\)"):  # fmt: skip
        bad_shape(x)
    to_int = bnx.BatchCenter(
        4, promote_dtype=lambda a, **kw: tuple(v.astype(jnp.int32) for v in a), rngs=nnx.Rngs(0)
    )
    with pytest.raises(TypeError, match=r"BatchCenter: .* x came back with dtype int32"):
        to_int(x)
    with pytest.raises(TypeError, match=r"BatchNorm: scale_metadata must be a mapping .* got"):
        ours(4, scale_metadata=[("out_sharding", None)], rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"BatchCenter: bias_metadata must be a mapping"):
        bnx.BatchCenter(4, bias_metadata={1: 2}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"BatchInhib: alpha_metadata must be a mapping"):
        bnx.BatchInhib(4, alpha_metadata=None, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"ZCANorm: bias_metadata must be a mapping"):
        bnx.ZCANorm(4, bias_metadata=None, rngs=nnx.Rngs(0))


def test_complex_input_is_refused_clearly():
    """flax accepts complex inputs; ours refuse them with a TypeError naming the layer."""
    z = jnp.ones((8, 4), jnp.complex64)
    for m in (
        ours(4, rngs=nnx.Rngs(0)),
        bnx.BatchCenter(4, rngs=nnx.Rngs(0)),
        bnx.BatchInhib(4, rngs=nnx.Rngs(0)),
    ):
        with pytest.raises(TypeError, match=rf"{type(m).__name__}: x must be a floating-point"):
            m(z)
    for m in (bnn.BatchNorm(), bnn.BatchCenter(), bnn.BatchInhib()):
        with pytest.raises(TypeError, match=rf"{type(m).__name__}: x must be a floating-point"):
            m.init(jax.random.key(0), z, use_running_average=False)


# ------------------------------------------------------------- Dropout: broadcast_dims


def _dropouts(dims, use_autodiff=False):
    """(ours, flax's) linen and NNX dropouts as functions of (x, key)."""
    ol = bnn.Dropout(0.5, broadcast_dims=dims, use_autodiff=use_autodiff)
    fl = nn.Dropout(0.5, broadcast_dims=dims)

    def linen(mdl):
        return lambda x, k: mdl.apply({}, x, deterministic=False, rngs={"dropout": k})

    def nnx_(cls, **kw):
        return lambda x, k: cls(0.5, broadcast_dims=dims, rngs=nnx.Rngs(dropout=k), **kw)(x)

    return (
        (linen(ol), linen(fl)),
        (nnx_(bnx.Dropout, use_autodiff=use_autodiff), nnx_(nnx.Dropout)),
    )


@pytest.mark.parametrize("use_autodiff", [False, True], ids=["custom_vjp", "autodiff"])
@pytest.mark.parametrize("dims", [(1, 2), (0,), (-1,), (2, 1, -2)])
def test_dropout_broadcast_dims_like_flax(dims, use_autodiff):
    """The same key gives flax's output (bitwise) and the gradient x -> sum(w * y) is
    w times the shared mask, in linen and NNX."""
    x = 1.0 + jax.random.normal(jax.random.key(0), (4, 3, 5, 6))
    w = jax.random.normal(jax.random.key(1), x.shape)
    key = jax.random.key(7)
    for o, f in _dropouts(dims, use_autodiff):
        yo, yf = jax.jit(o)(x, key), jax.jit(f)(x, key)
        np.testing.assert_array_equal(yo, yf)
        go = jax.jit(jax.grad(lambda x, o=o: jnp.sum(w * o(x, key))))(x)
        np.testing.assert_array_equal(go, w * (yf != 0) / 0.5)
        # one mask entry shared along every broadcast dim
        kept = np.asarray(yo != 0)
        for d in dims:
            np.testing.assert_array_equal(kept, np.take(kept, [0], axis=d).repeat(x.shape[d], d))


def test_dropout_broadcast_dims_errors():
    for bad in (1, ("a",), (True,)):
        with pytest.raises(TypeError, match=r"Dropout: broadcast_dims must be a sequence of int"):
            bnx.Dropout(0.5, broadcast_dims=bad, rngs=nnx.Rngs(0))
        with pytest.raises(TypeError, match=r"Dropout: broadcast_dims must be a sequence of int"):
            bnn.Dropout(0.5, broadcast_dims=bad).apply({}, jnp.ones((2, 3)), deterministic=True)
    m = bnx.Dropout(0.5, broadcast_dims=(2,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Dropout: broadcast_dims \(2,\) has axis 2, out of"):
        m(jnp.ones((2, 3)))


# ------------------------------------------------------------------ tuple of feature axes

AXES = [(1, 3), (-1, -2), (0, 2)]
X4 = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 3, 5, 2))
# float32, outputs of O(1) and gradients against flax.linen.BatchNorm: 1e-5 as
# tests/test_linen.py (measured: outputs 9.5e-7, statistics 4.8e-7)
AX_TOL = 1e-5


@pytest.mark.parametrize("axes", AXES, ids=str)
def test_linen_tuple_axis_like_flax_linen_batchnorm(axes):
    """Same variables (feature-shaped), outputs, gradients and running statistics as
    flax.linen.BatchNorm(axis=axes) over two steps (the second with a mask), and the
    same eval output; BatchCenter's running mean equals flax's."""
    init = nn.initializers.normal(1.0)
    o = bnn.BatchNorm(momentum=0.5, unbiased=False, axis=axes, scale_init=init, bias_init=init)
    f = nn.BatchNorm(momentum=0.5, use_fast_variance=False, axis=axes, scale_init=init,
                     bias_init=init)  # fmt: skip
    c = bnn.BatchCenter(momentum=0.5, axis=axes)
    w = jax.random.normal(jax.random.key(3), X4.shape)
    mask = jax.random.bernoulli(jax.random.key(4), 0.75, X4.shape)  # elementwise padding

    def run(mdl):
        v = mdl.init(jax.random.key(1), X4, use_running_average=False)
        outs = [v]
        for m in (None, mask):

            def loss(p, x, v=v, m=m):
                y, upd = mdl.apply({**v, "params": p}, x, use_running_average=False,
                                   mutable=["batch_stats"], mask=m)  # fmt: skip
                # the loss reads the valid positions only: our masked outputs are constants to
                # differentiation (garbage there must reach no gradient), flax's are not
                keep = 1.0 if m is None else m
                return jnp.sum(keep * w * y**2), (y, upd)

            (_, (y, upd)), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(v["params"], X4)
            v = {**v, **upd}
            outs.append((y, g, upd))
        return outs, mdl.apply(v, X4, use_running_average=True)

    (to, eo), (tf, ef) = jax.jit(lambda: (run(o), run(f)))()
    assert jax.tree.map(jnp.shape, to[0]) == jax.tree.map(jnp.shape, tf[0])
    assert to[0]["params"]["scale"].shape == tuple(X4.shape[a] for a in sorted(a % 4 for a in axes))
    jax.tree.map(np.testing.assert_array_equal, to[0], tf[0])
    for (yo, go, uo), (yf, gf, uf) in zip(to[1:], tf[1:], strict=True):
        np.testing.assert_allclose(yo, yf, atol=AX_TOL, rtol=AX_TOL)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=AX_TOL * float(jnp.abs(b).max())),
            go, gf,
        )  # fmt: skip
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=AX_TOL), uo, uf)
    np.testing.assert_allclose(eo, ef, atol=AX_TOL, rtol=AX_TOL)
    vc = c.init(jax.random.key(1), X4, use_running_average=False)
    _, uc = jax.jit(lambda v: c.apply(v, X4, use_running_average=False, mutable=["batch_stats"]))(
        vc
    )
    np.testing.assert_allclose(uc["batch_stats"]["mean"], tf[1][2]["batch_stats"]["mean"],
                               rtol=AX_TOL)  # fmt: skip


def test_nnx_tuple_axis_like_flax():
    """NNX BatchNorm(num_features=H*C, axis=(1, 3)): flax.nnx's flat layout; training
    matches flax.linen.BatchNorm(axis=(1, 3)) (flax.nnx's own BatchNorm fails to update
    its statistics with a tuple axis in flax 0.12), and the eval output from the same
    state matches flax.nnx.BatchNorm's."""
    o = bnx.BatchNorm(6, axis=(1, 3), momentum=0.5, unbiased=False, rngs=nnx.Rngs(0))
    f = theirs(6, axis=(1, 3), momentum=0.5, rngs=nnx.Rngs(0))
    assert spec(nnx.state(o)) == spec(nnx.state(f))
    lin = nn.BatchNorm(momentum=0.5, use_fast_variance=False, axis=(1, 3))
    v = lin.init(jax.random.key(0), X4, use_running_average=False)
    yl, upd = lin.apply(v, X4, use_running_average=False, mutable=["batch_stats"])
    y = nnx.jit(lambda m, x: m(x))(o, X4)
    np.testing.assert_allclose(y, yl, atol=AX_TOL, rtol=AX_TOL)
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            getattr(o, k)[...], upd["batch_stats"][k].reshape(-1), rtol=AX_TOL
        )
    st = nnx.state(f)
    nnx.replace_by_pure_dict(st, nnx.to_pure_dict(nnx.state(o)))
    nnx.update(f, st)
    np.testing.assert_allclose(
        o(X4, use_running_average=True), f(X4, use_running_average=True), atol=EVAL_ATOL
    )
    c = bnx.BatchCenter(6, axis=(1, 3), momentum=0.5, rngs=nnx.Rngs(0))
    c(X4)
    np.testing.assert_allclose(c.mean[...], o.mean[...], rtol=1e-6)


def test_tuple_axis_errors():
    x = jnp.ones((8, 3, 4))
    with pytest.raises(ValueError, match=r"BatchNorm: axis \(1, -2\) names the same axis twice"):
        bnn.BatchNorm(axis=(1, -2)).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"BatchNorm: axis must be an int or a non-empty tuple"):
        ours(4, axis=(), rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchCenter: axis \(0, 1, 2\) makes every axis"):
        bnx.BatchCenter(96, axis=(0, 1, 2), rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchNorm: axis 3 is out of range"):
        ours(12, axis=(1, 3), rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match=r"BatchNorm: x has 12 features on axis \(1, 2\)"):
        ours(4, axis=(1, 2), rngs=nnx.Rngs(0))(x)
    with pytest.raises(TypeError, match=r"IterNorm: axis must be an int \(one feature axis"):
        bnx.IterNorm(12, axis=(1, 2), rngs=nnx.Rngs(0))(x)
    with pytest.raises(TypeError, match=r"ZCANorm: axis must be an int \(one feature axis"):
        bnn.ZCANorm(axis=(1, 2)).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"BatchNorm: virtual_batch_size splits the leading"):
        ours(24, axis=(0, 1), virtual_batch_size=4, rngs=nnx.Rngs(0))(x)


# ------------------------------------------------------ what flax accepts, we accept


def _linen_train(mdl, x, **kw):
    """One training-mode forward of a linen layer: (y, batch_stats)."""
    v = mdl.init(jax.random.key(1), x, use_running_average=False, **kw)
    y, upd = mdl.apply(v, x, use_running_average=False, mutable=["batch_stats"], **kw)
    return y, upd["batch_stats"]


def test_integer_input_is_promoted_like_flax():
    """flax's dtype policy promotes an integer x to float32; so do our modules."""
    xi = jnp.arange(24).reshape(8, 3) % 5
    y, st = _linen_train(bnn.BatchNorm(unbiased=False), xi)
    yf, stf = _linen_train(nn.BatchNorm(use_fast_variance=False), xi)
    assert y.dtype == yf.dtype == jnp.float32
    np.testing.assert_allclose(y, yf, atol=EVAL_ATOL)
    np.testing.assert_allclose(st["var"], stf["var"], rtol=TRAIN_ATOL)
    o, f = ours(3, rngs=nnx.Rngs(0)), theirs(3, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(o(xi), f(xi), atol=EVAL_ATOL)
    for m in (bnx.BatchCenter(3, rngs=nnx.Rngs(0)), bnx.BatchInhib(3, rngs=nnx.Rngs(0))):
        assert m(xi).dtype == jnp.float32


def test_numpy_scalar_hyperparameters_like_flax():
    """np.float32 / np.int64 hyperparameters (what configs and np.prod give) work as the
    Python numbers they hold, under nnx.jit too (stored as Python scalars, not state)."""
    x = jax.random.normal(jax.random.key(0), (8, 3))
    kw = dict(momentum=np.float32(0.5), epsilon=np.float32(1e-3))
    o = ours(np.int64(3), **kw, rngs=nnx.Rngs(0))
    f = theirs(3, **kw, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(o, x), f(x), atol=EVAL_ATOL)
    np.testing.assert_allclose(o.var[...], f.var[...], rtol=TRAIN_ATOL)
    assert type(o.epsilon) is float and type(o.num_features) is int
    y, st = _linen_train(bnn.BatchNorm(unbiased=False, **kw), x)
    yf, stf = _linen_train(nn.BatchNorm(use_fast_variance=False, **kw), x)
    np.testing.assert_allclose(y, yf, atol=EVAL_ATOL)
    np.testing.assert_allclose(st["var"], stf["var"], rtol=TRAIN_ATOL)
    k = jax.random.key(2)
    ours_d = bnn.Dropout(np.float32(0.5)).apply({}, x, deterministic=False, rngs={"dropout": k})
    flax_d = nn.Dropout(np.float32(0.5)).apply({}, x, deterministic=False, rngs={"dropout": k})
    np.testing.assert_array_equal(ours_d, flax_d)
    y, _ = _linen_train(bnn.IterNorm(groups=np.int64(3), iterations=np.int32(2)), x)
    assert y.shape == x.shape
    d0 = bnn.Dropout(np.array(0.5)).apply({}, x, deterministic=False, rngs={"dropout": k})
    np.testing.assert_array_equal(d0, flax_d)  # a 0-d NumPy array is the number it holds
    for bad in (np.bool_(True), np.array([0.5]), "0.5"):  # a bool or an array is no number
        with pytest.raises(TypeError, match=r"BatchNorm: momentum must be a float in \[0, 1\]"):
            bnn.BatchNorm(momentum=bad).init(jax.random.key(0), x, use_running_average=False)


def test_jax_scalar_hyperparameters_under_nnx_jit_like_flax():
    """Concrete 0-d JAX arrays (jnp.float32(1e-3)) as NNX hyperparameters, as flax takes
    them: stored as the Python scalars they hold. Stored as arrays they were NNX state,
    traced by nnx.jit, and the op refused the tracer ("epsilon must be a Python float
    known at trace time"); eager calls worked, so only a jitted step failed. (Integer
    hyperparameters take Python and NumPy ints only, in every module and op.)"""
    x = jax.random.normal(jax.random.key(0), (8, 4))
    step = nnx.jit(lambda m, x: m(x))
    o = ours(4, epsilon=jnp.float32(1e-3), momentum=jnp.float32(0.5), rngs=nnx.Rngs(0))
    f = theirs(4, epsilon=jnp.float32(1e-3), momentum=jnp.float32(0.5), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(step(o, x), f(x), atol=EVAL_ATOL)
    assert type(o.epsilon) is float and type(o.momentum) is float
    others = {
        "BatchInhib": dict(rho=jnp.float32(2.0), epsilon=jnp.float32(1e-4), guard=jnp.float32(0.1)),
        "IterNorm": dict(epsilon=jnp.float32(1e-3)),
        "ZCANorm": dict(epsilon=jnp.float32(1e-3)),
    }
    for kind, kw in others.items():
        m = getattr(bnx, kind)(4, **kw, rngs=nnx.Rngs(0))
        want = getattr(bnx, kind)(4, **{k: v.item() for k, v in kw.items()}, rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(step(m, x), step(want, x), err_msg=kind)
    d = bnx.Dropout(jnp.float32(0.5), rngs=nnx.Rngs(dropout=3))
    assert type(d.rate) is float and step(d, x).shape == x.shape


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchCenter", "BatchInhib", "IterNorm", "ZCANorm"])
def test_axis_index_groups_without_axis_name_is_unused_like_flax(kind):
    """flax ignores axis_index_groups while its axis name is unbound (linen's init) or
    None; ours did not (NameError from the op)."""
    x = jax.random.normal(jax.random.key(0), (8, 4))
    groups = [[0, 1], [2, 3]]
    m = getattr(bnn, kind)(use_running_average=False, axis_name="d", axis_index_groups=groups)
    v = m.init(jax.random.key(1), x)
    assert jax.tree.leaves(v)
    a = getattr(bnx, kind)(4, axis_index_groups=groups, rngs=nnx.Rngs(0))(x)
    b = getattr(bnx, kind)(4, rngs=nnx.Rngs(0))(x)
    np.testing.assert_array_equal(a, b)


XM = jax.random.normal(jax.random.key(5), (4, 3, 5))
MASK = jax.random.bernoulli(jax.random.key(6), 0.7, (4, 3, 5)).at[0].set(True)


@pytest.mark.parametrize(
    "mask",
    [MASK, MASK[..., :1], MASK[:, :1, :], MASK[:1], MASK[0]],
    ids=["full", "(4,3,1)", "(4,1,5)", "(1,3,5)", "(3,5)"],
)
@pytest.mark.parametrize("axis", [-1, (1, 2)], ids=["axis-1", "axis(1,2)"])
def test_masks_broadcast_like_flax(axis, mask):
    """Any mask that broadcasts to x means what it means to flax, with one feature axis
    or several (before: a tuple axis refused partial broadcasts, quoting the flattened
    shape)."""
    y, st = _linen_train(bnn.BatchNorm(axis=axis, unbiased=False), XM, mask=mask)
    yf, stf = _linen_train(nn.BatchNorm(axis=axis, use_fast_variance=False), XM, mask=mask)
    np.testing.assert_allclose(y, yf, atol=AX_TOL)  # float32, O(1) outputs (AX_TOL above)
    for k in ("mean", "var"):
        np.testing.assert_allclose(st[k], stf[k], rtol=AX_TOL, atol=1e-7)


def test_a_row_shaped_mask_is_rows_at_every_batch_size():
    """A mask of x's shape without the feature axis is a row mask, also for a square x
    where flax would broadcast it over the features (the one documented difference: a
    padding mask must not change meaning when the batch size happens to equal the
    number of features). Spelled at x's rank, each reading matches flax's."""
    x = jax.random.normal(jax.random.key(0), (4, 4))
    m = jnp.array([True, True, True, False])
    y, _ = _linen_train(bnn.BatchNorm(unbiased=False), x, mask=m)
    y_rows, _ = _linen_train(bnn.BatchNorm(unbiased=False), x, mask=m[:, None])
    np.testing.assert_array_equal(y, y_rows)
    for spelled in (m[:, None], m[None, :]):
        y, st = _linen_train(bnn.BatchNorm(unbiased=False), x, mask=spelled)
        yf, stf = _linen_train(nn.BatchNorm(use_fast_variance=False), x, mask=spelled)
        keep = np.isfinite(np.asarray(yf))  # flax: NaN on a feature with no valid row
        np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(yf)[keep], atol=AX_TOL)
    np.testing.assert_array_equal(
        jbi.batch_norm(x, mask=m)[0], jbi.batch_norm(x, mask=m[:, None])[0]
    )


def test_a_numeric_mask_is_refused_with_the_fix():
    """flax casts a float mask to bool; ours refuses it (a mask selects, it never
    weights) and says what to pass."""
    msg = r"BatchNorm: mask must be a boolean array .*got dtype float32.*pass mask != 0"
    with pytest.raises(TypeError, match=msg):
        _linen_train(bnn.BatchNorm(), XM, mask=MASK.astype(jnp.float32))
