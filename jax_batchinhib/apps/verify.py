"""``jax-batchinhib verify``: every hand-derived VJP checked against autodiff.

For every op (and every BatchInhib option, and the inference forms) over several shapes
and float32 / float64 / bfloat16, the same random cotangent is pulled back through the
op's custom VJP and through ``jax.vjp`` of the naive reference in
:mod:`jax_batchinhib.reference`; the largest relative error (``max|ours - autodiff| /
max|autodiff|``) of the forward output and of each input's gradient is compared with the
dtype's tolerance (:data:`jax_batchinhib.testing.TOLERANCES`). Each case is one call of
:func:`jax_batchinhib.testing.check_vjp`, which compiles both sides as one program (here
with :func:`jax_batchinhib.apps._xla.run_once_options`: on CPU, XLA's optimization level 0
and its fusion emitters off, which cut the backend's compile time 2.6x).

The cases are :func:`cases`; :func:`run` checks them and :func:`format_table` prints them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_batchinhib import ops
from jax_batchinhib import reference as ref
from jax_batchinhib.apps._xla import run_once_options
from jax_batchinhib.testing import check_vjp

DTYPES = ("float32", "float64", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One check: ``op`` and ``reference`` called on ``make(key, dtype)`` with ``kwargs``."""

    name: str  # e.g. "batch_inhib[groups=2]"
    op: Callable
    reference: Callable
    shape: tuple[int, ...]
    make: Callable  # (key, dtype) -> tuple of positional args
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    dtype: str
    errors: dict  # input name -> max relative error
    tols: dict  # input name -> tolerance
    ok: bool
    seconds: float

    def as_dict(self):
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- inputs
# Inputs come from numpy (no compile per shape); each maker is (rng, dtype) -> args.


def _normal(rng, shape, dtype, scale=1.0, shift=0.0):
    return jnp.asarray((scale * rng.standard_normal(shape) + shift).astype(np.float32), dtype)


def _x_vec(shape, axis=-1, n_vec=2, shift=0.5, scale=1.5):
    """x of ``shape`` (non-zero mean, non-unit scale) and ``n_vec`` (N,) vectors."""

    def make(rng, dtype):
        n = shape[axis]
        x = _normal(rng, shape, dtype, scale, shift)
        return (x, *(_normal(rng, (n,), dtype, 0.5, 1.0) for _ in range(n_vec)))

    return make


def _bn_inf_args(shape):
    def make(rng, dtype):
        n = shape[-1]
        x = _normal(rng, shape, dtype, 1.5, 0.5)
        scale = _normal(rng, (n,), dtype, 0.5, 1.0)
        bias = _normal(rng, (n,), dtype, 0.5)
        mean = _normal(rng, (n,), dtype, 0.5, 0.5)
        var = jnp.asarray(0.5 + 2 * rng.random(n), dtype)
        return x, scale, bias, mean, var

    return make


def _bc_inf_args(shape):
    def make(rng, dtype):
        n = shape[-1]
        return (
            _normal(rng, shape, dtype, 1.5, 0.5),
            _normal(rng, (n,), dtype, 0.5),
            _normal(rng, (n,), dtype, 0.5, 0.5),
        )

    return make


def _mixed_np(rng, shape):
    """Features sharing 3 factors, so that their correlations are far from zero."""
    n = shape[-1]
    z = rng.standard_normal((*shape[:-1], 3))
    return z @ rng.standard_normal((3, n)) + 0.5 * rng.standard_normal(shape) + 0.3


def _bi_args(shape, groups=1):
    def make(rng, dtype):
        x = jnp.asarray(_mixed_np(rng, shape).astype(np.float32), dtype)
        return x, _normal(rng, ops.alpha_shape(shape[-1], groups), dtype, 0.5)

    return make


def _bi_inf_args(shape, groups=1):
    def make(rng, dtype):
        n = shape[-1]
        x = jnp.asarray(_mixed_np(rng, shape).astype(np.float32), dtype)
        alpha = _normal(rng, ops.alpha_shape(n, groups), dtype, 0.5)
        data = _mixed_np(rng, (64, n)).reshape(64, groups, n // groups)
        data = data - data.mean(0)
        cov = np.einsum("mgi,mgk->gik", data, data) / 64  # a covariance, like running stats
        cov = jnp.asarray((cov[0] if groups == 1 else cov).astype(np.float32), dtype)
        return x, alpha, cov

    return make


def _wh_args(shape, groups=1):
    """x with spread principal variances (so that ZCA's eigh reference is well
    conditioned), scale and bias."""

    def make(rng, dtype):
        n = shape[-1]
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        z = rng.standard_normal(shape)
        x = z @ (q * np.linspace(0.5, 2.0, n)).T + 0.3
        return (
            jnp.asarray(x.astype(np.float32), dtype),
            _normal(rng, (n,), dtype, 0.3, 1.0),
            _normal(rng, (n,), dtype, 0.3),
        )

    return make


def _wh_inf_args(shape, groups=1):
    def make(rng, dtype):
        x, scale, bias = _wh_args(shape, groups)(rng, dtype)
        _, st = ops.zca_norm(_wh_args((64, shape[-1]), groups)(rng, jnp.float32)[0], groups=groups)
        return x, scale, bias, st.mean.astype(dtype), st.whitening_matrix.astype(dtype)

    return make


def _dropout_args(shape):
    def make(rng, dtype):
        return _normal(rng, shape, dtype), 0.3, jax.random.key(int(rng.integers(2**31)))

    return make


def _sce_args(shape):
    def make(rng, dtype):
        logits = _normal(rng, shape, dtype, 2.0)
        t = np.exp(3.0 * rng.standard_normal(shape))
        labels = t / t.sum(-1, keepdims=True)  # soft labels: probabilities over the last axis
        return logits, jnp.asarray(labels.astype(np.float32), dtype)

    return make


def _sce_int_args(shape):
    def make(rng, dtype):
        logits = _normal(rng, shape, dtype, 2.0)
        labels = rng.integers(0, shape[-1], size=shape[:-1])  # a class index per example
        return logits, jnp.asarray(labels, jnp.int32)

    return make


# -------------------------------------------------------------------------- cases

SHAPES_2D = ((8, 4), (33, 7))
SHAPES_ND = ((4, 3, 3, 6),)


def cases(quick: bool = False) -> list[Case]:
    """All checks: each op over 2-3 shapes (rank 2 and 4, an odd batch, axis=1 for BN)."""
    shapes = SHAPES_2D[:1] if quick else SHAPES_2D + SHAPES_ND
    out: list[Case] = []
    for s in shapes:
        out.append(Case("batch_norm", ops.batch_norm, ref.batch_norm, s, _x_vec(s)))
        out.append(Case("batch_center", ops.batch_center, ref.batch_center, s, _x_vec(s, n_vec=1)))
        out.append(
            Case(
                "batch_norm_inference",
                ops.batch_norm_inference,
                ref.batch_norm_inference,
                s,
                _bn_inf_args(s),
            )
        )
        out.append(
            Case(
                "batch_center_inference",
                ops.batch_center_inference,
                ref.batch_center_inference,
                s,
                _bc_inf_args(s),
            )
        )
    if not quick:
        s = (5, 6, 3)  # features on axis 1
        out.append(
            Case("batch_norm[axis=1]", ops.batch_norm, ref.batch_norm, s, _x_vec(s, 1), {"axis": 1})
        )
    bi_shapes = ((16, 6), (40, 8)) if not quick else ((16, 6),)
    bi_options = [
        ("batch_inhib", {}, 1),
        ("batch_inhib[groups=2]", {"groups": 2}, 2),
        ('batch_inhib[correlation="variance"]', {"correlation": "variance"}, 1),
        ('batch_inhib[denominator="abs"]', {"denominator": "abs"}, 1),
        ('batch_inhib[guard_mode="relative"]', {"guard_mode": "relative"}, 1),
        ("batch_inhib[rho=3]", {"rho": 3.0}, 1),
    ]
    for s in bi_shapes:
        for name, kw, g in bi_options:
            out.append(Case(name, ops.batch_inhib, ref.batch_inhib, s, _bi_args(s, g), kw))
    if not quick:
        s = (4, 5, 6)
        out.append(Case("batch_inhib", ops.batch_inhib, ref.batch_inhib, s, _bi_args(s)))
    for s in bi_shapes:
        for name, kw, g in bi_options[:5]:
            iname = name.replace("batch_inhib", "batch_inhib_inference")
            out.append(
                Case(
                    iname,
                    ops.batch_inhib_inference,
                    ref.batch_inhib_inference,
                    s,
                    _bi_inf_args(s, g),
                    kw,
                )
            )
    wh_shapes = ((24, 6), (40, 8)) if not quick else ((24, 6),)
    wh_options = [
        ("iter_norm", ops.iter_norm, ref.iter_norm, {}, 1),
        ("iter_norm[groups=2]", ops.iter_norm, ref.iter_norm, {"groups": 2}, 2),
        # T=3: past convergence (T >= 8 here) the uncoupled Newton-Schulz iteration
        # amplifies round-off in the forward itself (docs/derivations.md, section 8)
        ("iter_norm[iterations=3]", ops.iter_norm, ref.iter_norm, {"iterations": 3}, 1),
        ("zca_norm", ops.zca_norm, ref.zca_norm, {}, 1),
        ("zca_norm[groups=2]", ops.zca_norm, ref.zca_norm, {"groups": 2}, 2),
    ]
    for s in wh_shapes:
        for name, op, rf, kw, g in wh_options:
            out.append(Case(name, op, rf, s, _wh_args(s, g), kw))
        for name, op, rf in (
            ("iter_norm_inference", ops.iter_norm_inference, ref.iter_norm_inference),
            ("zca_norm_inference[groups=2]", ops.zca_norm_inference, ref.zca_norm_inference),
        ):
            g = 2 if "groups" in name else 1
            out.append(Case(name, op, rf, s, _wh_inf_args(s, g), {"groups": g}))
    for s in shapes:
        out.append(Case("dropout", ops.dropout, ref.dropout, s, _dropout_args(s)))
        out.append(Case("softmax", ops.softmax, ref.softmax, s, _x_vec(s, n_vec=0)))
        out.append(
            Case(
                "softmax_cross_entropy",
                ops.softmax_cross_entropy,
                ref.softmax_cross_entropy,
                s,
                _sce_args(s),
            )
        )
        out.append(
            Case(
                "softmax_cross_entropy_with_integer_labels",
                ops.softmax_cross_entropy_with_integer_labels,
                ref.softmax_cross_entropy_with_integer_labels,
                s,
                _sce_int_args(s),
            )
        )
    return out


# ---------------------------------------------------------------------------- run


def run_case(case: Case, dtype: str, seed: int = 0) -> Result:
    """Check one case in one dtype with :func:`jax_batchinhib.testing.check_vjp`: the
    forward output and every floating input's gradient of ``case.op`` against autodiff
    of ``case.reference``, compiled as one program."""
    t0 = time.perf_counter()
    case_seed = zlib.crc32(f"{seed}/{case.name}{case.shape}".encode())
    rng = np.random.default_rng(case_seed)
    with jax.enable_x64(dtype == "float64"):
        args = case.make(rng, jnp.dtype(dtype))
        errs = check_vjp(
            case.op,
            case.reference,
            *args,
            key=case_seed,
            raise_on_error=False,
            compiler_options=run_once_options(),
            **case.kwargs,
        )
    return Result(
        op=case.name,
        shape="x".join(map(str, case.shape)),
        dtype=dtype,
        errors={k: e.max_rel for k, e in errs.items()},
        tols={k: e.tol for k, e in errs.items()},
        ok=all(e.ok for e in errs.values()),
        seconds=time.perf_counter() - t0,
    )


def unmatched(ops_filter, quick=False) -> tuple[list[str], list[str]]:
    """The substrings of ``ops_filter`` that name no case, and the case names."""
    names = sorted({c.name for c in cases(quick)})
    return [f for f in ops_filter or () if not any(f in n for n in names)], names


def run(dtypes=DTYPES, quick=False, ops_filter=None, progress=None) -> list[Result]:
    """Check every case in every dtype; ``ops_filter``: substrings of op names to keep
    (each must name at least one case: a typo is an error, not an empty pass)."""
    bad, names = unmatched(ops_filter, quick)
    if bad:
        raise ValueError(
            f"verify.run: ops_filter {bad[0]!r} is in no op's name; the names are: "
            + ", ".join(names)
        )
    todo = [
        (c, d)
        for c in cases(quick)
        for d in dtypes
        if not ops_filter or any(f in c.name for f in ops_filter)
    ]
    results = []
    for c, d in todo:
        results.append(run_case(c, d))
        if progress is not None:
            progress(len(results), len(todo), results[-1])
    return results


def format_table(results: list[Result]) -> str:
    """One row per (op, shape, dtype): the max relative error of each input's gradient
    (and of the forward ``output``), the tolerance, ok."""
    head = (
        f"{'op':36} {'shape':>9} {'dtype':>8}  {'max relative error per input':58} {'tol':>7}  ok"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        errs = "  ".join(f"{k}={v:.1e}" for k, v in r.errors.items())
        tol = max(r.tols.values())
        lines.append(
            f"{r.op:36} {r.shape:>9} {r.dtype:>8}  {errs:58} {tol:7.1e}  {'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """A short per-op, per-dtype table of the worst error over shapes and inputs."""
    byop: dict[str, dict[str, float]] = {}
    for r in results:
        base = r.op
        worst = max(v for k, v in r.errors.items() if k != "output") if len(r.errors) > 1 else 0
        d = byop.setdefault(base, {})
        d[r.dtype] = max(d.get(r.dtype, 0.0), worst)
    dtypes = [d for d in DTYPES if any(d in v for v in byop.values())]
    lines = ["| op | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    for op, d in byop.items():
        lines.append(
            f"| `{op}` | " + " | ".join(f"{d.get(t, float('nan')):.1e}" for t in dtypes) + " |"
        )
    n_ok = sum(r.ok for r in results)
    lines.append("")
    lines.append(
        f"{n_ok}/{len(results)} checks passed (worst relative gradient error over shapes and "
        f"inputs; tolerances "
        + ", ".join(f"{t} {tol:.1e}" for t, tol in _tols().items() if t in dtypes)
        + ")"
    )
    return "\n".join(lines)


def _tols():
    from jax_batchinhib.testing import TOLERANCES

    return {str(k): v for k, v in TOLERANCES.items()}


def main(args) -> int:
    """Run the checks for the parsed ``args`` of ``jax-batchinhib verify``; return the exit code."""
    dtypes = tuple(args.dtypes)
    progress = None
    bar = None
    if not args.json:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc="verify", unit="check", leave=False, file=sys.stderr)

            def progress(i, n, r):
                bar.total = n
                bar.update(1)

        except ImportError:  # tqdm is in the [examples] extra
            bar = None
    results = run(dtypes=dtypes, quick=args.quick, ops_filter=args.ops, progress=progress)
    if bar is not None:
        bar.close()
    failed = [r for r in results if not r.ok]
    if args.json:
        json.dump(
            {
                "ok": not failed,
                "n_checks": len(results),
                "n_failed": len(failed),
                "jax_version": jax.__version__,
                "backend": jax.default_backend(),
                "results": [r.as_dict() for r in results],
            },
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
    else:
        if args.summary:
            print(summary(results))
        else:
            print(format_table(results))
            print()
            print(summary(results))
        if failed:
            print(f"\nFAILED: {len(failed)} of {len(results)} checks over tolerance:")
            for r in failed:
                print(f"  {r.op} {r.shape} {r.dtype}: {r.errors}")
        else:
            print(f"\nAll {len(results)} hand-derived VJPs agree with autodiff.")
    return 1 if failed else 0
