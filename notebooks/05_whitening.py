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
# # 5. Decorrelation: BatchInhib, IterNorm and ZCA on the same batch
#
# Three layers that act on the correlation between features. BatchInhib lets each
# feature subtract the others in proportion to their correlation. ZCA whitening
# (Huang et al., "Decorrelated Batch Normalization", CVPR 2018) maps the batch to
# identity covariance with $W = \Sigma^{-1/2}$ from an eigendecomposition. IterNorm
# (Huang et al., "Iterative Normalization", CVPR 2019) approximates the same $W$ with
# `iterations` Newton steps. The derivations of their backward passes are in
# `docs/derivations.md`, section 8.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jax_batchinhib as jb

jax.config.update("jax_enable_x64", True)  # float64: whitening to 1e-8 is visible

# %% [markdown]
# A batch of 512 rows with 12 features driven by three shared factors, so that the
# features are strongly correlated in blocks.

# %%
rng = np.random.default_rng(0)
m, n = 512, 12
z = rng.standard_normal((m, 3))
load = np.kron(np.eye(3), np.ones((1, 4))) * rng.uniform(0.8, 1.5, (3, n))
x = jnp.asarray(z @ load + 0.4 * rng.standard_normal((m, n)) + 2.0)

outs = {
    "input": x,
    "BatchInhib": jb.batch_inhib(x, jnp.zeros((n, n)))[0],
    "IterNorm (T=5)": jb.iter_norm(x)[0],
    "ZCA": jb.zca_norm(x)[0],
}


def corr(y):
    return np.corrcoef(np.asarray(y).T)


fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
for ax, (name, y) in zip(axes, outs.items(), strict=True):
    im = ax.imshow(corr(y), vmin=-1, vmax=1, cmap="RdBu_r")
    off = np.abs(corr(y))[~np.eye(n, dtype=bool)].max()
    ax.set_title(f"{name}\nmax |off-diag corr| = {off:.2f}")
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

# %% [markdown]
# BatchInhib at full strength (alpha 0) does not whiten, and here it over-corrects: each
# feature subtracts the others weighted by their correlation, the weights normalized to
# sum to one, so within a block of four strongly correlated features it subtracts about
# their mean, and every pair in a block comes out *negatively* correlated (printed
# below): the largest $|\mathrm{corr}|$ falls, but the sign flips. ZCA removes the
# correlation up to $\epsilon$: the output covariance is exactly $I - \epsilon W^2$ (as
# $W(\Sigma + \epsilon I)W = I$), so what remains is of the order of
# $\epsilon/\lambda_{\min}$, and the cell below checks the measured correlation against
# that prediction. IterNorm with the default 5 steps leaves some of it, with 10 steps
# almost none; past convergence more steps make it worse (next section).

# %%
off_diag = ~np.eye(n, dtype=bool)
max_off = {k: np.abs(corr(y))[off_diag].max() for k, y in outs.items()}
print({k: f"{v:.1e}" for k, v in max_off.items()})
block = np.kron(np.eye(3), np.ones((4, 4))).astype(bool) & off_diag
inhib_block = corr(outs["BatchInhib"])[block]
print(f"BatchInhib, pairs within a block: {inhib_block.min():.2f} to {inhib_block.max():.2f} "
      f"(input: {corr(x)[block].min():.2f} to {corr(x)[block].max():.2f})")  # fmt: skip
wz5 = jb.zca_norm(x)[1].whitening_matrix[0]
c_pred = np.eye(n) - 1e-5 * np.asarray(wz5 @ wz5)  # the output covariance I - eps W^2
zca_pred = np.abs(c_pred / np.sqrt(np.outer(np.diag(c_pred), np.diag(c_pred))))[off_diag].max()
max_off_t10 = np.abs(corr(jb.iter_norm(x, iterations=10)[0]))[off_diag].max()
print(
    f"ZCA: measured {max_off['ZCA']:.6e}, predicted {zca_pred:.6e}; "
    f"IterNorm (T=10): {max_off_t10:.1e}"
)

# %% [markdown]
# ## Whitening quality against `iterations`
#
# $\lVert W \Sigma W^\top - I \rVert_F$ for IterNorm's $W$ with $T = 1..16$ steps, and
# for ZCA's.

# %%
sig = None
errs = []
ts = list(range(1, 17))
for t in ts:
    _, st = jb.iter_norm(x, iterations=t)
    sig = st.cov[0] + 1e-5 * jnp.eye(n)
    w = st.whitening_matrix[0]
    errs.append(float(jnp.linalg.norm(w @ sig @ w.T - jnp.eye(n))))
_, sz = jb.zca_norm(x)
wz = sz.whitening_matrix[0]
err_zca = float(jnp.linalg.norm(wz @ sig @ wz.T - jnp.eye(n)))
cond = float(np.linalg.cond(np.asarray(sig)))

fig, ax = plt.subplots(figsize=(5, 3.4))
ax.semilogy(ts, errs, "o-", label="IterNorm")
ax.axhline(err_zca, color="k", ls="--", label="ZCA")
ax.set_xlabel("iterations T")
ax.set_ylabel(r"$\|W\Sigma W^\top - I\|_F$")
ax.set_title(f"condition number of Σ: {cond:.0f}")
ax.legend()
plt.show()
print("IterNorm:", [f"{e:.1e}" for e in errs], "ZCA:", f"{err_zca:.1e}")

# %% [markdown]
# The error falls slowly while the small eigenvalues of $\Sigma$ (far below its trace)
# are still being raised, then quadratically, to 4e-7 at $T = 10$ here;
# more ill-conditioned batches need more steps.
# `tests/test_whitening.py::test_iter_norm_approaches_identity` checks the same descent
# on another batch ($T \le 10$) against the scalar recursion on the eigenvalues.
#
# Past convergence the error grows again, exponentially: in floating point the iterates
# do not commute exactly with $\Sigma_N$, and this uncoupled form of Newton's iteration
# amplifies that round-off at each step (more so the larger the condition number; here
# 56, in float64). So more iterations are not always better: the papers' default $T = 5$
# stops well before this, and large $T$ should be avoided (`docs/derivations.md`,
# section 8).
#
# What this notebook claims, checked:

# %%
# ZCA decorrelates up to epsilon: its correlation is I - eps W^2's (float64 round-off)
assert abs(max_off["ZCA"] - zca_pred) <= 1e-6 * zca_pred and max_off["ZCA"] < 1e-3
# BatchInhib lowers the largest |corr| but flips the sign within the blocks
assert max_off["BatchInhib"] < max_off["input"] and np.all(inhib_block < 0)
assert max_off["BatchInhib"] > 1e-2  # ... so it does not remove the correlation
assert max_off_t10 < 1e-3 < max_off["IterNorm (T=5)"] < max_off["input"]
assert all(b < a for a, b in zip(errs[:9], errs[1:10], strict=True))  # falls, T = 1..10
assert 1e-7 < errs[9] < 1e-6 and err_zca < 1e-8  # 4e-7 at T = 10
assert errs[-1] > 1e3 * min(errs)  # and grows again past convergence
