"""The package's layout: which module imports which, lazy submodules, and arguments that
are honoured or refused (never silently replaced)."""

import ast
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_batchinhib as jbi
from jax_batchinhib import fold, ops, reference, running, testing
from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx
from jax_batchinhib.apps import models

PKG = pathlib.Path(jbi.__file__).parent
#: The library core: everything but the applications and ``python -m jax_batchinhib``.
CORE = sorted(
    p
    for p in PKG.rglob("*.py")
    if "apps" not in p.relative_to(PKG).parts and p.name != "__main__.py"
)
FORBIDDEN = ("argparse", "tqdm", "sklearn", "matplotlib")


def _run(code: str) -> str:
    root = str(PKG.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": root, "JAX_PLATFORMS": "cpu", "PATH": ""},
        cwd=root,
    )
    return out.stdout.strip()


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports (absolute names; relative ones resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = path.relative_to(PKG.parent).with_suffix("").parts[: -node.level]
                base = ".".join(pkg + ((base,) if base else ()))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_core_imports_no_application_and_no_application_library():
    assert len(CORE) >= 15, CORE
    for path in CORE:
        for name in _imports(path):
            assert not name.startswith("jax_batchinhib.apps"), (path, name)
            assert name.split(".")[0] not in FORBIDDEN, (path, name)
        assert "SystemExit" not in path.read_text(), path


def test_import_jax_batchinhib_does_not_import_flax_and_submodules_are_lazy():
    out = _run(
        "import sys, jax_batchinhib as jbi\n"
        "print('flax' in sys.modules)\n"
        "jbi.linen.BatchNorm, jbi.nnx.BatchNorm, jbi.reference.batch_norm\n"
        "jbi.fold, jbi.parallel, jbi.running, jbi.testing\n"
        "print('flax' in sys.modules)\n"
    )
    assert out.split() == ["False", "True"]
    assert {"linen", "nnx", "reference", "fold", "parallel", "running"} <= set(dir(jbi))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        jbi.nope  # noqa: B018


def test_nnx_does_not_import_linen():
    out = _run(
        "import sys, jax_batchinhib.nnx\n"
        "print('jax_batchinhib.linen' in sys.modules, 'jax_batchinhib.apps' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


# ------------------------------------------------- arguments honoured or refused


def test_check_vjp_honours_rtol_zero():
    x = jax.random.normal(jax.random.key(0), (16, 3))
    errs = testing.check_vjp(
        ops.batch_norm, reference.batch_norm, x, rtol=0.0, raise_on_error=False
    )
    assert {e.tol for e in errs.values()} == {0.0}
    with pytest.raises(TypeError, match="check_vjp: rtol must be a finite float >= 0"):
        testing.check_vjp(ops.batch_norm, reference.batch_norm, x, rtol=True)


def test_check_vjp_tolerance_follows_the_narrowest_output():
    """A float64 scale on a float32 x (jax_enable_x64): the op and the reference compute
    in float32 (y is float32), so the scale's gradient is float32-accurate; check_vjp
    held it to float64's 1e-10 and blamed the op. The tolerance is float32's for every
    input of such a call. A float32 scale on a float64 x gives a float64 y, and dx is held
    to float64's tolerance (it was loosened to float32's, and a VJP 1e-6 off passed);
    the float32 scale's own gradient to float32's. Every input float64: float64's."""
    f32, f64 = testing.tolerance(jnp.float32), testing.tolerance(jnp.float64)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float32)
        s64 = jnp.linspace(0.5, 1.5, 3, dtype=jnp.float64)
        b64 = jnp.zeros(3, jnp.float64)
        errs = testing.check_vjp(ops.batch_norm, reference.batch_norm, x, s64, b64)
        assert {n: e.tol for n, e in errs.items() if n != "output"} == dict.fromkeys(
            ("x", "scale", "bias"), f32
        )
        x64 = x.astype(jnp.float64)
        errs = testing.check_vjp(ops.batch_norm, reference.batch_norm, x64, s64, b64)
        assert {e.tol for e in errs.values()} == {f64}
        s32, b32 = s64.astype(jnp.float32), b64.astype(jnp.float32)
        errs = testing.check_vjp(ops.batch_norm, reference.batch_norm, x64, s32, b32)
        assert {n: e.tol for n, e in errs.items()} == {
            "output": f64, "x": f64, "scale": f32, "bias": f32
        }, errs  # fmt: skip
        assert errs["x"].max_rel < 1e-12, errs  # measured 1.4e-16


def test_flax_batchnorm_refuses_momentum_none():
    with pytest.raises(ValueError, match="norm='flax_batchnorm' needs a float momentum"):
        models.norm_layers("flax_batchnorm", index=0, train=True, momentum=None)
    with pytest.raises(ValueError, match="norm='flax_batchnorm' needs a float momentum"):
        models.nnx_norm_layers("flax_batchnorm", 3, momentum=None, rngs=nnx.Rngs(0))
    (bn,) = models.norm_layers("flax_batchnorm", index=0, train=True, momentum=0.5)
    assert isinstance(bn, nn.BatchNorm) and bn.momentum == 0.5


def test_fold_batch_norm_takes_the_layers_epsilon():
    x = jax.random.normal(jax.random.key(0), (16, 3))
    dense, bn = nn.Dense(4), bnn.BatchNorm(use_running_average=True, epsilon=0.5)
    dv = dense.init(jax.random.key(1), x)
    h = dense.apply(dv, x)
    stats = {"mean": jnp.full((4,), 0.1), "var": jnp.full((4,), 0.2)}
    bv = {"params": bn.init(jax.random.key(2), h)["params"], "batch_stats": stats}
    p = fold.fold_batch_norm(dv["params"], bv["params"], stats, epsilon=bn.epsilon)
    # float32 round-off of a 3-term dot product and a rsqrt: measured 1e-7
    np.testing.assert_allclose(dense.apply({"params": p}, x), bn.apply(bv, h), atol=1e-5)
    with pytest.raises(TypeError, match="epsilon"):
        fold.fold_batch_norm(dv["params"], bv["params"], stats)  # no silent 1e-5


def test_every_op_has_a_reference_with_its_signature():
    """The README's promise: ``reference.<name>`` is the naive forward of every public op,
    with the same parameters (names, kinds, defaults), so the two are interchangeable."""
    import inspect

    names = [n for n in jbi.__all__ if callable(getattr(jbi, n)) and n[0].islower()]
    ops_with_ref = [n for n in names if hasattr(reference, n)]
    # every public function but the tools (plain jnp or helpers, no custom rule) has one
    assert set(names) - set(ops_with_ref) == {"alpha_shape", "check_vjp", "inhibition_matrix"}
    assert len(ops_with_ref) == 14

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for n in ops_with_ref:
        assert params(getattr(jbi, n)) == params(getattr(reference, n)), n


@pytest.mark.parametrize("name", ["batch_norm", "batch_center", "batch_inhib"])
def test_reference_takes_virtual_batch_size_like_the_op(name):
    x = jax.random.normal(jax.random.key(0), (12, 4)) * 2.0 + 1.0
    args = {"batch_norm": (), "batch_center": (), "batch_inhib": (jnp.zeros((4, 4)),)}[name]
    mask = jnp.arange(12) % 5 != 0
    for kw in ({}, {"mask": mask}):
        y_op, st_op = getattr(ops, name)(x, *args, virtual_batch_size=4, **kw)
        y_ref, st_ref = getattr(reference, name)(x, *args, virtual_batch_size=4, **kw)
        # float32 round-off of sums over 4 rows: measured 5e-7
        np.testing.assert_allclose(y_op, y_ref, atol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), st_op, st_ref)
    # and it is not the whole-batch answer
    assert not np.allclose(y_op, getattr(reference, name)(x, *args, mask=mask)[0], atol=1e-3)


def test_softmax_cross_entropy_returns_the_logits_dtype():
    logits = jnp.zeros((2, 4), jnp.float16)
    labels = jnp.eye(4, dtype=jnp.float32)[:2]
    for f in (ops.softmax_cross_entropy, reference.softmax_cross_entropy):
        assert f(logits, labels).dtype == jnp.float16
        assert f(logits.astype(jnp.float32), labels.astype(jnp.float16)).dtype == jnp.float32


@pytest.mark.parametrize("name", ["BatchNorm", "BatchCenter", "BatchInhib"])
def test_modules_pass_use_fast_variance_to_the_op(name, monkeypatch):
    seen = []
    # BatchNorm/BatchCenter call the ops' running-average form (statistics unbatched
    # under vmap); BatchInhib calls the op itself.
    where, op_name = {
        "BatchNorm": (running, "batch_norm_for_running"),
        "BatchCenter": (running, "batch_center_for_running"),
    }.get(name, (ops, "batch_inhib"))
    op = getattr(where, op_name)

    def spy(*args, **kwargs):
        seen.append(kwargs["use_fast_variance"])
        return op(*args, **kwargs)

    monkeypatch.setattr(where, op_name, spy)
    x = jax.random.normal(jax.random.key(0), (8, 4))
    for flag in (False, True):
        mdl = getattr(bnn, name)(use_running_average=False, use_fast_variance=flag)
        v = mdl.init(jax.random.key(1), x)
        mdl.apply(v, x, mutable=["batch_stats"])
        getattr(bnx, name)(4, use_fast_variance=flag, rngs=nnx.Rngs(0))(x)
    # linen init, linen apply, NNX call: one op call each, with the module's flag
    assert seen == [False] * 3 + [True] * 3
