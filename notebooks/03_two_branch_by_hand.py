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
# # 3. The two-branch network, backpropagated by hand
#
# The derivation quoted in docs/derivations.md, section 6, ends with a small network and
# chains its gradients by hand:
#
# ```text
# branch A:  x1A = x W1A + b1A   z1A = sin(x1A)   zDP = z1A ⊙ M (dropout)   yA = zDP W2A + b2A
# branch B:  x1B = x W1B         xBN = x1B − mean_rows(x1B) + c            (batch centering)
# head:      zBN = [ReLU(xBN), yA]   x2B = zBN W2B + b2B   L = mean_rows CE(softmax(x2B), t)
# ```
#
# (row-major: `x` is `(m, d)`, a Dense layer is `x W + b` with `W` of shape `(in, out)`,
# as Flax stores it). `jax_batchinhib.apps.two_branch.grads_by_hand` writes the backward out
# one rule per line; here it runs next to `jax.grad` of the Flax model
# (`jax_batchinhib.apps.models.TwoBranch`), and then the seed's own lines are tried where
# they differ.

# %%
import inspect

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from jax_batchinhib.apps import two_branch as tb
from jax_batchinhib.apps.models import TwoBranch

jax.config.update("jax_enable_x64", True)  # float64 for the whole notebook: errors at round-off

# %% [markdown]
# ## The backward, line by line
#
# The function, as it is in the library (the comments say what the seed wrote where it
# differs):

# %%
src = inspect.getsource(tb.grads_by_hand)
print(src[src.index("    p = params") :])

# %% [markdown]
# ## Next to autodiff
#
# A batch of 12 digits-sized inputs (64 features), 10 classes, `features_a = 6`,
# `features_b = 5`, dropout 0.3. The dropout mask is the one the Flax module draws: an
# interceptor (`tb.dropout_keep_mask`) reads the module's key and the op's
# `keep_mask(key, rate, shape)`. Parameters in float64, centering bias non-zero.

# %%
m, d, fa, fb, K, rate = 12, 64, 6, 5, 10, 0.3
model = TwoBranch(fa, fb, K, dropout_rate=rate)
kx, kp, kc, kd = jax.random.split(jax.random.key(0), 4)
x = jax.random.uniform(kx, (m, d), jnp.float64)
labels = jax.nn.one_hot(jnp.arange(m) % K, K, dtype=jnp.float64)
variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(kp, x, train=False))
variables["params"]["center"]["bias"] = 0.3 * jax.random.normal(kc, (fb,), jnp.float64)
rngs = {"dropout": kd}

keep, _ = jax.jit(lambda v: tb.dropout_keep_mask(model, v, x, rngs))(variables)
loss_h, g_hand = jax.jit(tb.grads_by_hand, static_argnums=4)(
    variables["params"], x, labels, keep, rate
)
loss_a, g_auto = jax.jit(lambda v: tb.grads_autodiff(model, v, x, labels, rngs))(variables)


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


rows = ["| parameter | shape | max abs gradient | relative error by hand vs jax.grad |"]
rows.append("|---|---|---|---|")
errors = {}
for path, ga in jax.tree_util.tree_leaves_with_path(g_auto):
    keys = [k.key for k in path]
    gh = g_hand[keys[0]][keys[1]]
    errors["/".join(keys)] = rel(gh, ga)
    rows.append(
        f"| `{'/'.join(keys)}` | {tuple(ga.shape)} | {float(jnp.max(jnp.abs(ga))):.2e} | "
        f"{errors['/'.join(keys)]:.1e} |"
    )
print(f"loss by hand {float(loss_h):.15f}, through the model {float(loss_a):.15f}")
display(Markdown("\n".join(rows)))
assert abs(float(loss_h) - float(loss_a)) < 1e-12
# every one (a NaN fails: max() would skip it); float64 round-off, about 1e-16 measured
assert all(e < 1e-13 for e in errors.values()), errors

# %% [markdown]
# Every parameter agrees to float64 round-off (about 1e-16). The `jax.grad` side runs the
# model with the library's own rules for dropout, centering and the cross-entropy, so
# this checks the chain by hand against those rules as JAX composes them.
# `tests/test_two_branch.py` asserts it (tolerance 1e-10) with those rules and with the
# modules' `use_autodiff=True` (autodiff of the reference forwards; the loss keeps the
# library's cross-entropy there).
#
# ## Where the seed's equations are wrong
#
# `docs/derivations.md` (section 7) lists the mistakes of the derivation this network
# comes from. Each is tried here on the same batch, by replacing one line of the chain with
# the seed's and comparing with `jax.grad`. Some of the seed's lines do not even have a
# shape that fits a batch; those are shown as the shapes that clash.

# %%
p = variables["params"]
_, c = tb.forward(p, x, keep, rate)
yB = jax.nn.softmax(c["x2B"], -1)
dx2B = (yB - labels) / m
dzBN = dx2B @ p["fc2b"]["kernel"].T
dReLU, dyA = dzBN[:, :fb], dzBN[:, fb:]
dxBN = dReLU * (c["xBN"] > 0)
z2A = c["zDP"] @ p["fc2a"]["kernel"] + p["fc2a"]["bias"]

seed = {}
# 1. batch centering: dL/dx1B = dL/dxBN (1 - 1/m), only the diagonal of the Jacobian
seed["fc1b/kernel", "centering: dx1B = dxBN (1 − 1/m)"] = x.T @ (dxBN * (1 - 1 / m))
# 2. FC_2A's weight gradient from its output z2A instead of its input zDP
seed["fc2a/kernel", "dθ2A from the output z2A"] = z2A.T @ dyA
# 3. the loss gradient of the batch-mean loss without 1/m (the seed's y_B − ŷ_B)
seed["fc2b/kernel", "dx2B = y_B − ŷ_B (a summed loss; the mean needs 1/m)"] = c["zBN"].T @ (
    yB - labels
)
# 4. dz_DP = dz2A − θ2A: a difference where a product belongs; shapes (m, fa) and (fa, fa)
# broadcast only when m == fa (or fa == 1). Carried on here by subtracting θ2A's column
# sums, one reading among several (its row sums give another error), which fits only
# because FC_2A is square (6 → 6): the sums are indexed by its outputs and subtracted
# where its inputs belong. Then through dropout, sin and FC_1A:
dzDP_seed = dyA - jnp.sum(p["fc2a"]["kernel"], axis=0)
seed["fc1a/kernel", "dz_DP = dz2A − θ2A"] = x.T @ (dzDP_seed * c["M"] * jnp.cos(c["x1A"]))

rows = ["| parameter | seed's line | relative error vs jax.grad |", "|---|---|---|"]
seed_err = {}
for (name, what), g in seed.items():
    a, b = name.split("/")
    seed_err[name, what] = rel(g, g_auto[a][b])
    rows.append(f"| `{name}` | {what} | {seed_err[name, what]:.2f} |")
display(Markdown("\n".join(rows)))
# each seed line is off by far more than round-off (the threshold of test_seed_errors.py)
assert all(e > 0.1 for e in seed_err.values()), seed_err

# %% [markdown]
# And the lines that cannot give the gradient's shape: a product of the two operands as
# written is either undefined (the shapes clash, or η is not defined) or of another shape
# than the gradient (x1A · x1A: an elementwise (12, 6), where dθ1A is (64, 6)):

# %%
clashes = [
    ("dθ2B = (y_B − ŷ_B) z_BN", (yB - labels).shape, c["zBN"].shape, p["fc2b"]["kernel"].shape),
    ("dz_BN = (y_B − ŷ_B) θ2B", (yB - labels).shape, p["fc2b"]["kernel"].shape, dzBN.shape),
    ("dθ1A = dL/dx1A · x1A", c["x1A"].shape, c["x1A"].shape, p["fc1a"]["kernel"].shape),
    ("dθ1B = dL/dx1B · η", dxBN.shape, "η undefined", p["fc1b"]["kernel"].shape),
]
rows = ["| seed's line | left operand | right operand | gradient must be |", "|---|---|---|---|"]
for line, a, b, want in clashes:
    rows.append(f"| {line} | {a} | {b} | {want} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# - The weight gradients need a transpose and a sum over the batch:
#   $d\theta = (\text{input})^\top\, d(\text{output})$, e.g. $z_{BN}^\top\, dx_{2B}$,
#   shape `(features_b + features_a, K)`; the seed's "$(y_B - \hat y_B)\,z_{BN}$" is a
#   product of an `(m, K)` and an `(m, 11)` array.
# - $dz_{BN} = dx_{2B}\,\theta_{2B}^\top$ (the seed omits the transpose).
# - $d\theta_{1A} = x^\top dx_{1A}$ uses the layer's input $x$, not its pre-activation
#   $x_{1A}$; $d\theta_{1B} = x^\top dx_{1B}$ (the seed's $\eta$ is not defined).
# - The seed's $dz_{2A}$ adds a term $(y - \hat y_A)$ from a loss on branch A, but the
#   network has no output on branch A: $dz_{2A}$ is only the $y_A$ slice of
#   $dz_{BN}$.
#
# ## The size of each mistake
#
# Relative error of each parameter's gradient: the corrected chain (grey, round-off)
# against the seed's line (red) where it can be evaluated.

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
names = list(errors)
ax.barh(names, [max(e, 1e-18) for e in errors.values()], color="0.6", label="by hand (corrected)")
for i, ((name, what), e) in enumerate(seed_err.items()):
    ax.barh(f"{name}\n[{what}]", e, color="tab:red", label="seed's line" if i == 0 else None)
ax.set_xscale("log")
ax.set_xlabel("max relative error vs jax.grad")
ax.axvline(1e-10, color="k", ls=":", lw=0.8)
ax.legend(loc="lower right", fontsize=8)
ax.tick_params(axis="y", labelsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the seed gets right: the softmax cross-entropy gradient $y_B - \hat y_B$ (per
# example; divide by $m$ for the batch mean), the dropout rule $dx = dy \odot M$, the
# ReLU mask, the sine's $\cos(x_{1A})$ and the overall order of the chain. The
# corrected chain is section 6 of `docs/derivations.md`; each of the seed's mistakes
# has its own test in `tests/test_seed_errors.py`.
