"""Property test: every op, drawn with its options, against autodiff of its reference.

For each op (every training form, every inference form, dropout, softmax,
softmax_cross_entropy, and the whitening ops when the library has them) hypothesis
draws the dtype (float32, or float64 inside ``jax.enable_x64(True)``), the shape (rank
2 to 4, every dimension at most 6, at most 8 features), the feature axis (any
position, written positive or negative), a row mask (None, or one with at least two
valid rows per statistics group), ghost batches (``virtual_batch_size``), ``groups``
(a divisor of the number of features), every BatchInhib option (each either left at
its default or given explicitly, ``guard=None`` included), the parameters' presence
(``scale``/``bias`` or None) and the data. Each case goes through
:func:`jax_batchinhib.testing.check_vjp`: the forward output and the cotangent of
every floating input, hand-derived rule against ``jax.vjp`` of
:mod:`jax_batchinhib.reference` (ghost batches: ``jax.vmap`` of the reference over
the sub-batches, statistics averaged, when the reference has no
``virtual_batch_size`` of its own).

Hypothesis profiles (registered in ``tests/conftest.py``):

- ``ci`` (the default): ``derandomize=True``, so every run draws the same examples and
  a failure reproduces; the test is parametrized by op, so every op gets its examples.
- ``thorough``: many more examples, drawn at random each run::

      pytest tests/test_properties.py -n 0 --hypothesis-profile=thorough

Left out, each with its measured reason beside its predicate: alpha's and cov's
cotangents of BatchInhib with two features per group (``_two_per_group``: the exact value
is O(guard^2) or 0, so a relative error measures cancellation).

Compilation dominates the run time on CPU: ``check_vjp`` keeps one compiled program
per (op, reference, static options, shapes), so repeated configurations with new data
cost milliseconds.
"""

from __future__ import annotations

import collections
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.testing import check_vjp

# ------------------------------------------------------------------- the ops drawn

TRAINING = ("batch_norm", "batch_center", "batch_inhib")
INFERENCE = ("batch_norm_inference", "batch_center_inference", "batch_inhib_inference")
OTHERS = ("dropout", "softmax", "softmax_cross_entropy")
WHITENING = tuple(
    name
    for name in ("iter_norm", "zca_norm", "iter_norm_inference", "zca_norm_inference")
    if hasattr(jb, name) and hasattr(ref, name)
)
OPS = TRAINING + INFERENCE + OTHERS + WHITENING

#: Explicit values of each BatchInhib option; each option is also drawn "left out"
#: (its default), and the defaults appear here too, given explicitly.
INHIB_OPTIONS = {
    "rho": (1.0, 0.5, 4.0),
    "epsilon": (1e-5, 1e-3, 0.1),
    "correlation": ("pearson", "variance"),
    "denominator": ("signed", "abs"),
    "guard": (None, 1e-3, 0.05, 0.5),
    "guard_mode": ("absolute", "relative"),
}
FEATURES = (1, 2, 3, 4, 6, 8)
DIMS = (1, 2, 3, 6)  # the other dimensions


def _takes(fn, name):
    return name in inspect.signature(fn).parameters


def _ghost_reference(reference):
    """``reference`` with ``virtual_batch_size``: the reference itself when it has one,
    else ``jax.vmap`` of it over sub-batches of the leading axis with the statistics
    averaged over them (a composition of the reference, so autodiff of it is still
    autodiff of the reference)."""
    if _takes(reference, "virtual_batch_size"):
        return reference

    @functools.wraps(reference)
    def ghost(x, *params, virtual_batch_size, mask=None, **kw):
        b, v = x.shape[0], virtual_batch_size
        xs = x.reshape((b // v, v) + x.shape[1:])
        ms = None if mask is None else mask.reshape((b // v, v) + mask.shape[1:])
        y, stats = jax.vmap(lambda xs, ms: reference(xs, *params, mask=ms, **kw))(xs, ms)
        return y.reshape(x.shape), jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)

    return ghost


#: One object per op, so that check_vjp's compiled programs are shared across examples.
GHOST_REFS = {name: _ghost_reference(getattr(ref, name)) for name in TRAINING}


# ---------------------------------------------------------------------- strategies


@st.composite
def _layout(draw, *, training):
    """Shape, feature axis (as written), number of features, leading-axis ghost size."""
    ndim = draw(st.integers(2, 4))
    pos = draw(st.integers(0, ndim - 1))
    nfeat = draw(st.sampled_from(FEATURES))
    other = [draw(st.sampled_from(DIMS)) for _ in range(ndim - 1)]
    if training and np.prod(other) < 2:  # training statistics need two values per feature
        other[0] = 2
    shape = tuple(other[:pos] + [nfeat] + other[pos:])
    axis = draw(st.sampled_from((pos, pos - ndim)))
    return shape, axis


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _statistics(draw, spec):
    """Row mask and ghost batches for a training form, on top of ``spec``'s layout."""
    shape, pos = spec["shape"], spec["axis"] % len(spec["shape"])
    per_row = int(np.prod([s for a, s in enumerate(shape) if a not in (0, pos)]))
    vbs = None
    if pos != 0 and _takes(getattr(jb, spec["op"]), "virtual_batch_size"):
        # each sub-batch needs two values per feature (two valid rows with a mask)
        sizes = [v for v in _divisors(shape[0]) if v * per_row >= 2]
        vbs = draw(st.sampled_from([None, *sizes]))
    return dict(mask=draw(st.booleans()), virtual_batch_size=vbs)


@st.composite
def _cases(draw, op):
    """A spec (plain values; the arrays are made from it inside the dtype's context)."""
    spec = dict(op=op, dtype=draw(st.sampled_from(("float32", "float64"))))
    spec["shape"], spec["axis"] = draw(_layout(training=op in TRAINING or op in WHITENING))
    nfeat = spec["shape"][spec["axis"]]
    spec["seed"] = draw(st.integers(0, 2**32 - 1))
    spec["x_scale"] = draw(st.sampled_from((1.0, 0.1, 10.0)))
    kw = {}
    if op in TRAINING or (op in WHITENING and not op.endswith("_inference")):
        spec.update(draw(_statistics(spec)))
    if op.startswith("batch_inhib") or op in WHITENING:
        spec["groups"] = draw(st.sampled_from(_divisors(nfeat)))
    if op.startswith("batch_inhib"):
        for name, values in INHIB_OPTIONS.items():
            if draw(st.booleans()):
                kw[name] = draw(st.sampled_from(values))
    if op in TRAINING and _takes(getattr(jb, op), "use_fast_variance") and draw(st.booleans()):
        kw["use_fast_variance"] = draw(st.booleans())
    if _takes(getattr(jb, op), "epsilon") and not op.startswith("batch_inhib"):
        if draw(st.booleans()):
            kw["epsilon"] = draw(st.sampled_from((1e-5, 1e-3, 0.1)))
    if op.startswith(("batch_norm", "batch_center")) or op in WHITENING:
        spec["params"] = draw(st.sampled_from(((True, True), (False, False), (True, False))))
    if op == "dropout":
        spec["rate"] = draw(st.sampled_from((0.25, 0.5, 0.0, 1.0)))
    if op == "softmax_cross_entropy":
        spec["labels"] = draw(st.sampled_from(("soft", "onehot", "unnormalized")))
    if op.startswith("iter_norm") and _takes(getattr(jb, op), "iterations"):
        if draw(st.booleans()):
            kw["iterations"] = draw(st.sampled_from((1, 3, 5)))
    spec["kw"] = kw
    return spec


# ------------------------------------------------------------------ building a case


def _data(rng, shape, axis, dtype, scale):
    """Correlated features with non-zero means (a realistic batch); ``axis`` >= 0."""
    n = shape[axis]
    z = rng.standard_normal(shape)
    mix = np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = np.moveaxis(np.moveaxis(z, axis, -1) @ mix, -1, axis)
    mean = rng.standard_normal(n).reshape([n if a == axis else 1 for a in range(len(shape))])
    return jnp.asarray(scale * x + mean, dtype)


def _row_mask(rng, shape, axis, vbs):
    """A row mask (x's shape without the feature axis) with two valid rows or more in each
    ghost batch (in the whole batch without ghost batches)."""
    rows = tuple(s for a, s in enumerate(shape) if a != axis)
    m = rng.random(rows) < 0.6
    groups = m.reshape(shape[0] // vbs, -1) if vbs else m.reshape(1, -1)
    for g in groups:  # views into m
        g[rng.choice(g.size, 2, replace=False)] = True
    return jnp.asarray(m)


def _vec(rng, n, dtype, offset=0.0):
    return jnp.asarray(offset + 0.5 * rng.standard_normal(n), dtype)


def _psd(rng, shape, dtype):
    """Covariance-like (groups, n, n) or (n, n): symmetric positive definite."""
    a = rng.standard_normal(shape)
    c = a @ np.swapaxes(a, -1, -2) / shape[-1] + 0.1 * np.eye(shape[-1])
    return jnp.asarray(c, dtype)


def _build(spec):
    """(op, reference, args, kwargs) for check_vjp; call inside the dtype's context."""
    op, dtype, shape, axis = spec["op"], jnp.dtype(spec["dtype"]), spec["shape"], spec["axis"]
    rng = np.random.default_rng(spec["seed"])
    nfeat = shape[axis]
    x = _data(rng, shape, axis % len(shape), dtype, spec["x_scale"])
    kw = dict(spec["kw"])
    fn, rf = getattr(jb, op), getattr(ref, op)
    if spec.get("mask"):
        kw["mask"] = _row_mask(rng, shape, axis % len(shape), spec.get("virtual_batch_size"))
    if spec.get("virtual_batch_size"):
        kw["virtual_batch_size"] = spec["virtual_batch_size"]
        rf = GHOST_REFS[op]
    if "groups" in spec:
        kw["groups"] = spec["groups"]
    use_scale, use_bias = spec.get("params", (True, True))
    scale = _vec(rng, nfeat, dtype, 1.0) if use_scale else None
    bias = _vec(rng, nfeat, dtype) if use_bias else None
    if op in ("dropout",):
        return fn, rf, (x, spec["rate"], jax.random.key(spec["seed"] % 2**31)), kw
    kw["axis"] = axis
    if op == "softmax":
        return fn, rf, (x,), kw
    if op == "softmax_cross_entropy":
        z = rng.standard_normal(shape)
        if spec["labels"] == "onehot":
            hot = np.argmax(z, axis=axis)
            t = np.moveaxis(np.eye(nfeat)[hot], -1, axis)
        else:
            t = np.exp(z) / np.sum(np.exp(z), axis=axis, keepdims=True)
            if spec["labels"] == "unnormalized":
                t = t * (0.5 + rng.random(np.sum(t, axis=axis, keepdims=True).shape))
        return fn, rf, (x, jnp.asarray(t, dtype)), kw
    if op == "batch_norm":
        return fn, rf, (x, scale, bias), kw
    if op == "batch_center":
        return fn, rf, (x, bias), kw
    mean, var = (
        _vec(rng, nfeat, dtype),
        jnp.asarray(np.exp(0.5 * rng.standard_normal(nfeat)), dtype),
    )
    if op == "batch_norm_inference":
        return fn, rf, (x, scale, bias, mean, var), kw
    if op == "batch_center_inference":
        return fn, rf, (x, bias, mean), kw
    ashape = jb.alpha_shape(nfeat, kw["groups"])
    alpha = jnp.asarray(rng.standard_normal(ashape), dtype)
    if op == "batch_inhib":
        return fn, rf, (x, alpha), kw
    if op == "batch_inhib_inference":
        return fn, rf, (x, alpha, _psd(rng, ashape, dtype)), kw
    if op in ("iter_norm", "zca_norm"):
        return fn, rf, (x, scale, bias), kw
    if op in ("iter_norm_inference", "zca_norm_inference"):
        n = nfeat // kw["groups"]
        w = np.eye(n) + 0.3 * rng.standard_normal((kw["groups"], n, n))
        return fn, rf, (x, scale, bias, mean, jnp.asarray(w, dtype)), kw
    raise NotImplementedError(f"no case builder for {op}")


# ------------------------------------------------------------------------- the test

#: Relative tolerances from measurement (largest error over every comparison; 2-core
#: CPU). float64: 9.1e-15 over the "ci" examples (batch_inhib 8.1e-15, softmax 3.5e-15,
#: the others <= 1.3e-15) and 8.1e-15 over 59 random BatchInhib examples: 1e-12.
#: float32: 3.7e-6 over "ci" (batch_inhib; batch_norm 2.2e-6, softmax 1.5e-6, the others
#: <= 1.2e-6) and 6.7e-6 over the random BatchInhib examples: 1e-4, check_vjp's default.
RTOL = {"float64": 1e-12, "float32": 1e-4}

#: Largest relative error seen per (op, dtype), and examples run per op (printed at the
#: end of the module with ``-s``).
MEASURED: dict = collections.defaultdict(lambda: (0.0, None))
COUNTS: dict = collections.Counter()


def _two_per_group(spec):
    """BatchInhib with exactly two features per group: only the output and x's cotangent
    are compared, not alpha's and cov's. With two features R_12 = g r h(g r) is 1 up to
    the guard (exactly 1/(1+guard^2) with the relative guard), so the exact alpha/cov
    cotangent is O(guard^2) (exactly 0) while the terms the rule sums are O(1/D): a
    normwise relative error there measures cancellation, not the rule. Measured: float64,
    absolute errors 7.6e-17 and 1.7e-16 were 1.0e-8 and 0.97 relative to exact values of
    7.5e-9 and ~1e-16; float32 (against float64 autodiff, same float32 inputs, 6 draws):
    the rule 4.3e-2 relative with the absolute guard (float32 autodiff of the reference
    6.4e-7), 6e9 with the relative guard (autodiff 45), i.e. round-off of an exact zero."""
    return (
        spec["op"].startswith("batch_inhib") and spec["shape"][spec["axis"]] // spec["groups"] == 2
    )


def _whitening_one_per_group_float32(spec):
    """IterNorm and ZCA in float32 with one feature per group: left out (float64 covers
    them). There IterNorm's Sigma_N = 1, every Newton step stays at P = 1, and
    W = 1/sqrt(tr Sigma) is batch norm's scale, and ZCA's W = 1/sqrt(Sigma) the same; with
    few counted rows the whitened output is +-1 whatever x is, so the exact x cotangent
    is O(epsilon / variance) and the rule's and the reference's terms cancel to it.
    Measured: two rows, x's cotangent 6e-8 absolute = 3.1e-4 relative for IterNorm, and
    8.9e-8 = 4.7e-4 relative for ZCA (rule and autodiff of the reference alike are
    float32 round-off of that cancellation)."""
    return (
        spec["op"] in ("iter_norm", "zca_norm")
        and spec["dtype"] == "float32"
        and spec["shape"][spec["axis"]] // spec["groups"] == 1
    )


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\nexamples per (op, dtype):", dict(sorted(COUNTS.items())))
    for k, (v, spec) in sorted(MEASURED.items()):
        print(f"max rel error {k[0]:>24} {k[1]:>8}: {v:.2e}  {spec}")


#: BatchInhib has the most options (six, with groups, masks and ghost batches on top):
#: its two forms get this many times the profile's examples.
INHIB_FACTOR = 3
INHIB_OPS = ("batch_inhib", "batch_inhib_inference")


@pytest.mark.parametrize("op", [op for op in OPS if op not in INHIB_OPS])
@given(data=st.data())
def test_rule_matches_autodiff_of_reference(op, data):
    _check(op, data)


@pytest.mark.parametrize("op", INHIB_OPS)
@settings(max_examples=INHIB_FACTOR * settings.default.max_examples)
@given(data=st.data())
def test_batch_inhib_rule_matches_autodiff_of_reference(op, data):
    _check(op, data)


def _check(op, data):
    spec = data.draw(_cases(op), label="case")
    assume(not _whitening_one_per_group_float32(spec))
    with jax.enable_x64(spec["dtype"] == "float64"):
        fn, rf, args, kw = _build(spec)
        note(f"kwargs: { {k: v for k, v in kw.items() if k != 'mask'} }")
        argnums = (0,) if _two_per_group(spec) else None
        errors = check_vjp(
            fn, rf, *args, key=spec["seed"] % 997, argnums=argnums, rtol=RTOL[spec["dtype"]], **kw
        )
    COUNTS[op, spec["dtype"]] += 1
    worst = max(e.max_rel for e in errors.values())
    if worst >= MEASURED[op, spec["dtype"]][0]:
        MEASURED[op, spec["dtype"]] = (worst, spec)


def test_one_feature_groups_relative_guard_float32_finite():
    """A group of one feature has no off-diagonal weight (A = D = 0, R = 0): the exact
    cotangents are dx = dy-path only and dalpha = 0. The relative guard's floor tau was
    1e-12 in every dtype, and (guard^2 tau^2)^2 underflowed to 0 in float32 (0/0 = NaN);
    it is now 1e-8 in float32."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 2)), jnp.float32)
    alpha = jnp.zeros(jb.alpha_shape(2, 2), jnp.float32)

    @jax.jit
    def grads(x, alpha):
        return jax.grad(
            lambda x, a: jnp.sum(jb.batch_inhib(x, a, groups=2, guard_mode="relative")[0] ** 2),
            (0, 1),
        )(x, alpha)

    gx, ga = grads(x, alpha)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(ga))
    np.testing.assert_array_equal(ga, 0.0)  # no off-diagonal entries: nothing to learn
    y, _ = jb.batch_inhib(x, alpha, groups=2, guard_mode="relative")
    np.testing.assert_array_equal(y, x)  # R = 0: the identity


@pytest.mark.parametrize("guard", [0.02, 0.01, 1e-4])
@pytest.mark.parametrize("case", ["constant_feature", "one_feature_group"])
def test_relative_guard_small_delta_float32_matches_float64(case, guard):
    """A row with no off-diagonal weight (a constant feature: r = 0; a group of one
    feature) has A = D = 0, where the backward's denominator is delta^2 tau^2. Below
    delta = 0.02 its square underflowed float32 (1.6e-39 at 0.02, tau = 1e-8) and the
    gradients were 0/0 = NaN everywhere; dividing by it twice keeps them finite. Held to
    the float32 tolerance, 1e-4 of the largest entry of either gradient, against the
    float64 op: with the constant feature left out, the other two features are a
    two-feature group whose true dalpha is 0 up to tau (docs/derivations.md,
    "Conditioning"), the difference of O(1) terms, so float32 gives it as round-off of
    the gradients' scale (measured 5e-7 against a largest entry of about 3)."""
    x = np.random.default_rng(1).standard_normal((8, 3))
    groups = 1
    if case == "constant_feature":
        x[:, 1] = 0.0
    else:
        x, groups = x[:, :2], 2
    n = x.shape[1]

    def grads(x, alpha):
        f = lambda x, a: jnp.sum(  # noqa: E731
            jb.batch_inhib(x, a, groups=groups, guard_mode="relative", guard=guard)[0] ** 2
        )
        return jax.grad(f, (0, 1))(x, alpha)

    got = grads(jnp.asarray(x, jnp.float32), jnp.zeros(jb.alpha_shape(n, groups), jnp.float32))
    with jax.enable_x64(True):
        want = grads(jnp.asarray(x), jnp.zeros(jb.alpha_shape(n, groups), jnp.float64))
        want = [np.asarray(w) for w in want]
    scale = max(np.abs(w).max() for w in want)
    for g, w in zip(got, want, strict=True):
        assert np.all(np.isfinite(g)), (case, guard, g)
        assert np.abs(np.asarray(g, np.float64) - w).max() <= 1e-4 * scale, (case, guard)
