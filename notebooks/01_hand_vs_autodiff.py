# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Hand-derived VJPs against autodiff, op by op
#
# Every op in `jax_batchinhib` is a `jax.custom_vjp` whose backward rule was derived by
# hand (`docs/derivations.md`). Here each rule meets `jax.vjp` of the naive forward in
# `jax_batchinhib.reference`: the same random cotangent is pulled back through both, and
# the relative error `max|ours − autodiff| / max|autodiff|` of every input's gradient is
# tabulated, then plotted against batch size and dtype. Last, a small timing on this
# machine's CPU.
#
# The full sweep (more shapes, bfloat16 too) is `jax-batchinhib verify`.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import jax_batchinhib as jb
from jax_batchinhib import reference as ref
from jax_batchinhib.apps import verify

print("jax", jax.__version__, "on", jax.default_backend())

# %% [markdown]
# ## Every op, float64
#
# One row per op and option; one column per input (plus the forward `output`). In
# float64 a right rule sits at round-off (about 1e-16; the tolerance is 1e-10), so this
# table is the proof; float32 follows in the plot below (1e-7 to a few 1e-5, tolerance
# 1e-4).

# %%
results = verify.run(dtypes=("float64",), quick=True)
inputs = ["output", "x", "scale", "bias", "alpha", "mean", "var", "cov", "logits", "labels"]
inputs = [k for k in inputs if any(k in r.errors for r in results)]
lines = ["| op | shape | dtype | " + " | ".join(inputs) + " | ok |"]
lines.append("|---" * (len(inputs) + 4) + "|")
for r in results:
    cells = [f"{r.errors[k]:.1e}" if k in r.errors else "" for k in inputs]
    lines.append(
        f"| `{r.op}` | {r.shape} | {r.dtype} | "
        + " | ".join(cells)
        + f" | {'✓' if r.ok else '✗'} |"
    )
print(f"{sum(r.ok for r in results)}/{len(results)} within tolerance")
display(Markdown("\n".join(lines)))
# the proof fails loudly: a ✗ row, or a float64 error above round-off, stops the notebook
assert all(r.ok for r in results), [r.op for r in results if not r.ok]
worst64 = max(max(r.errors.values()) for r in results)
assert worst64 < 1e-13, worst64  # float64 round-off; measured at most a few 1e-15

# %% [markdown]
# ## Error against batch size and dtype
#
# The gradient error of three ops for batch sizes 8 to 512 (64 features; BatchInhib 16
# features). In float64 the error stays at round-off (1e-16 to 1e-15); in float32 it
# grows with the batch, from 1e-7 to a few 1e-5 for batch_norm at m = 512 (sums of m
# float32 terms), below the float32 tolerance of 1e-4. bfloat16 (not plotted; printed
# below) stays under its tolerance of 2⁻⁶ but is not 0: both sides compute in float32 and
# round once to bfloat16 at the end, and where the two float32 results straddle a
# rounding boundary they land one bfloat16 step (2⁻⁸ relative) apart, which shows as a
# worst error between 0 and about 1e-3 (relative to the largest entry).

# %%
OPS = {
    "batch_norm": (jb.batch_norm, ref.batch_norm, lambda m: verify._x_vec((m, 64)), {}),
    "batch_inhib": (jb.batch_inhib, ref.batch_inhib, lambda m: verify._bi_args((m, 16)), {}),
    "softmax_cross_entropy": (
        jb.softmax_cross_entropy,
        ref.softmax_cross_entropy,
        lambda m: verify._sce_args((m, 64)),
        {},
    ),
}
BATCHES = [8, 64, 512]
curves = {}
for name, (op, rf, make, kw) in OPS.items():
    for dtype in ("float32", "float64", "bfloat16"):
        errs = []
        for m in BATCHES:
            case = verify.Case(name, op, rf, (m,), make(m), kw)
            r = verify.run_case(case, dtype)
            errs.append(max(v for k, v in r.errors.items() if k != "output"))
        curves[name, dtype] = errs

fig, ax = plt.subplots(figsize=(7, 4))
for (name, dtype), errs in curves.items():
    if dtype == "bfloat16":
        continue
    ax.loglog(BATCHES, errs, "o-" if dtype == "float32" else "s--", label=f"{name} {dtype}")
ax.axhline(1e-4, color="k", lw=0.8, ls=":")
ax.axhline(1e-10, color="k", lw=0.8, ls=":")
ax.text(BATCHES[0], 1.3e-4, "float32 tolerance", fontsize=8)
ax.text(BATCHES[0], 1.3e-10, "float64 tolerance", fontsize=8)
ax.set_xlabel("batch size m")
ax.set_ylabel("max relative gradient error")
ax.set_title("hand-derived VJP vs jax.vjp of the reference")
ax.legend(fontsize=7, ncol=2, loc="center right")
ax.grid(alpha=0.3)
plt.show()
# what the text above says, checked: float64 at round-off, float32 and bfloat16 under
# their tolerances
TOL = {"float64": 1e-13, "float32": 1e-4, "bfloat16": 2.0**-6}
for (name, dtype), errs in curves.items():
    if dtype == "bfloat16":
        print(
            f"{name} bfloat16: "
            + ", ".join(f"m={m}: {e:.1e}" for m, e in zip(BATCHES, errs, strict=True))
        )
    assert max(errs) < TOL[dtype], (name, dtype, errs)

# %% [markdown]
# ## Timing: ours against autodiff of the reference (this CPU)
#
# `jit(grad(loss ∘ op))` against `jit(grad(loss ∘ reference))` at one size, float32,
# measured interleaved (ours, theirs, ours, ...) so that machine noise hits both alike;
# the median of the repeats. This is a small CPU measurement for orientation only: the
# benchmark harness (`jax-batchinhib bench`) measures properly, memory included.

# %%
M, N = 2048, 64
key = jax.random.key(0)
x = jax.random.normal(key, (M, N)) + 0.5
xi = verify._bi_args((M, 32))(np.random.default_rng(0), jnp.float32)
ones = jnp.ones((N,))


pairs = {
    "batch_norm": (
        lambda f: jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b)[0] ** 2), (0, 1, 2))),
        (x, ones, ones),
        jb.batch_norm,
        ref.batch_norm,
    ),
    "batch_inhib": (
        lambda f: jax.jit(jax.grad(lambda x, a: jnp.sum(f(x, a)[0] ** 2), (0, 1))),
        xi,
        jb.batch_inhib,
        ref.batch_inhib,
    ),
}
timings = {}
for name, (wrap, args, ours, theirs) in pairs.items():
    f_ours, f_ref = wrap(ours), wrap(theirs)
    jax.block_until_ready(f_ours(*args))
    jax.block_until_ready(f_ref(*args))
    t = {"ours": [], "autodiff": []}
    for _ in range(15):
        for label, f in (("ours", f_ours), ("autodiff", f_ref)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            t[label].append(time.perf_counter() - t0)
    timings[name] = {k: 1e6 * float(np.median(v)) for k, v in t.items()}

names = list(timings)
ours_us = [timings[k]["ours"] for k in names]
ref_us = [timings[k]["autodiff"] for k in names]
fig, ax = plt.subplots(figsize=(6, 3.2))
pos = np.arange(len(names))
ax.bar(pos - 0.2, ours_us, 0.4, label="hand-derived (custom_vjp)")
ax.bar(pos + 0.2, ref_us, 0.4, label="autodiff of reference")
ax.set_xticks(pos, names)
ax.set_ylabel("µs per forward+backward (median)")
ax.set_title(f"jit(grad) on this CPU, float32, x of shape ({M}, {N}) / ({M}, 32)")
ax.legend(fontsize=8)
plt.show()
rows = ["| op | ours (µs) | autodiff (µs) | autodiff / ours |", "|---|---|---|---|"]
for k, a, b in zip(names, ours_us, ref_us, strict=True):
    rows.append(f"| `{k}` | {a:.0f} | {b:.0f} | {b / a:.2f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The ratio depends on the machine and on XLA's fusion, and these few timings on a shared
# CPU are noisy: read the table above for this run, and `BENCHMARKS.md` for medians over
# interleaved runs. What the hand-derived rules buy is less what they
# cost in time than what they keep: `dropout` keeps its mask packed to bits (1/32 of a
# float32 mask), `batch_norm` keeps `x` and per-feature vectors. See `jax-batchinhib bench`.
