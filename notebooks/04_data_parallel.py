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
# # 4. Data-parallel training on 4 CPU devices equals the single-device run
#
# `jax_batchinhib.parallel.data_parallel` jits an ordinary single-device train step with
# the batch split along its first axis over a 1-D mesh and everything else (parameters,
# Adam state, running statistics) replicated. The model needs no `axis_name`: every batch
# statistic is a sum over the batch axis, which XLA's SPMD partitioner turns into a local
# sum plus an all-reduce, so each device works on a quarter of the batch and every number
# is the one a single device computes on the whole batch, up to the order of float
# additions. Here an MLP with our BatchNorm + BatchInhib and dropout trains on the digits
# for two epochs, once on one device and once over four, from the same initial state
# with the same global batches and dropout keys.
#
# This machine has no GPU, so XLA splits the CPU into 4 devices. That must happen before
# JAX creates its CPU backend, so it is the first thing the notebook does. On GPUs the
# same code runs unchanged on `jax.devices()[:4]`. What is synchronized and what each
# step communicates: `docs/scaling.md`.

# %%
import jax

# before any computation: split the host CPU into 4 XLA devices
# (jax_batchinhib.parallel.set_cpu_device_count(4) does the same, with a clear error if too late)
jax.config.update("jax_num_cpu_devices", 4)

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jax_batchinhib import parallel  # noqa: E402
from jax_batchinhib.apps import train  # noqa: E402
from jax_batchinhib.apps.models import MLP  # noqa: E402

print("jax", jax.__version__, "devices:", jax.devices())

# %% [markdown]
# ## The data, the model, one train step
#
# Global batch 64 (16 rows per device), two epochs of shuffled digits, Adam. The step is
# `jax_batchinhib.apps.train.train_step`, the same function the single-device training uses.

# %%
x_train, y_train, x_test, y_test = train.load_digits_split()
BATCH, EPOCHS = 64, 2
rng = np.random.default_rng(0)
steps = len(x_train) // BATCH
order = np.concatenate([rng.permutation(len(x_train))[: steps * BATCH] for _ in range(EPOCHS)])
xb = x_train[order].reshape(-1, BATCH, 64)
yb = y_train[order].reshape(-1, BATCH)
keys = jax.random.split(jax.random.key(1), len(xb))  # dropout keys, one per step

model = MLP((64, 64), norm="batchnorm+inhib", dropout_rate=0.1)
tx = optax.adam(3e-3)
state0 = train.init_state(model, tx, jax.random.key(0), xb[0])
step = functools.partial(train.train_step, model, tx)
print(f"{len(xb)} steps of {BATCH} rows; params:", jax.tree.map(jnp.shape, state0.params))


def run(step_fn, state):
    losses = []
    for t in range(len(xb)):
        state, (loss, _) = step_fn(state, xb[t], yb[t], keys[t])
        losses.append(loss)
    return state, np.asarray(jnp.stack(losses))


# %% [markdown]
# ## One device, then four

# %%
s1, loss1 = run(jax.jit(step), state0)

mesh = parallel.make_mesh(4)
dp_step = parallel.data_parallel(step, mesh, donate=False)
s4, loss4 = run(dp_step, parallel.replicate(state0, mesh))

x_sharded = parallel.shard_batch(jnp.asarray(xb[0]), mesh)
print("a batch on the mesh:", [(str(s.device), s.data.shape) for s in x_sharded.addressable_shards])
replicated = all(a.sharding.is_fully_replicated for a in jax.tree.leaves(s4.params))
print("parameters replicated:", replicated)
assert replicated

# %% [markdown]
# ## The two runs agree to float32 round-off
#
# Loss per step of both runs and their difference; then the largest difference of any
# parameter and running statistic after the last step, and the test metrics of both
# models in eval mode (running statistics).

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(loss1, label="1 device", lw=3, alpha=0.5)
ax1.plot(loss4, "--", label="4 devices (data_parallel)")
ax1.set(xlabel="step", ylabel="train loss (batch of 64)", title="loss curves")
ax1.legend()
diff = np.abs(loss4 - loss1)
nz = diff > 0  # steps where the two losses differ at all (the others: the same bits)
ax2.semilogy(np.flatnonzero(nz), diff[nz], "o", ms=4)
ax2.set(
    xlabel="step",
    ylabel="|loss(4) - loss(1)|",
    title=f"difference; {np.sum(~nz)} of {len(diff)} steps bitwise equal",
)
fig.tight_layout()
plt.show()


def max_rel(a, b):  # np.max, not max(): a NaN anywhere makes the result NaN
    return float(
        np.max(
            [
                float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
                for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            ]
        )
    )


print(f"loss curves:   max |difference| = {np.max(np.abs(loss4 - loss1)):.1e}")
print(f"parameters:    max relative difference = {max_rel(s4.params, s1.params):.1e}")
print(f"batch_stats:   max relative difference = {max_rel(s4.batch_stats, s1.batch_stats):.1e}")
metrics = {}
for name, s in (("1 device", s1), ("4 devices", s4)):
    tl, ta = train.evaluate(model, s, x_test, y_test)
    metrics[name] = (float(tl), float(ta))
    print(f"test ({name}): loss {float(tl):.4f}, accuracy {float(ta):.4f}")

# the claim, checked (measured 4.8e-7, 5.6e-7, 7.9e-7 in the run saved here, 2.4e-7,
# 2.6e-7, 7.5e-7 in an earlier one on the same 2-core CPU; the bounds leave a margin of
# 4 to 12 times)
assert np.max(np.abs(loss4 - loss1)) < 3e-6
assert max_rel(s4.params, s1.params) < 3e-6
assert max_rel(s4.batch_stats, s1.batch_stats) < 1e-5
assert abs(metrics["1 device"][0] - metrics["4 devices"][0]) < 1e-4
assert metrics["1 device"][1] == metrics["4 devices"][1]

# %% [markdown]
# The curves lie on top of each other: the differences are float32 round-off (the sums
# are added in another order on 4 devices), a few 1e-7 relative (the cell asserts
# bounds 4 to 12 times what was measured), and they stay there
# over two epochs of Adam; the test metrics agree to the digits printed. The running
# statistics and the parameters are also the same bits on every device (they are
# replicated outputs of one SPMD program); every leaf is checked:


# %%
def same_on_every_device(a):
    shards = [np.asarray(s.data) for s in a.addressable_shards]
    return len(shards) == 4 and all(np.array_equal(shards[0], s) for s in shards)


leaves = jax.tree.leaves((s4.batch_stats, s4.params))
print(
    len(leaves), "leaves, each the same on the 4 devices:", all(map(same_on_every_device, leaves))
)
assert all(map(same_on_every_device, leaves))
