"""docs/scaling.md's counted figures, measured in the compiled programs.

- "What each step communicates": the bytes in the all-reduce ops of the compiled
  program, on 8 CPU devices with N = 64 features, for the forward and for forward +
  backward (a loss of y alone), under ``jax.shard_map`` with ``axis_name`` (vma checks on)
  and under ``jax.jit`` with the batch sharded (GSPMD, no axis_name). These are exact
  counts of the program text, not timings.
- The selects a plain vmap over the parameters leaves in batch_norm and batch_center:
  one per statistic in the jitted forward that returns them, none in its gradient.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import parallel

ND, B, N = 8, 64, 64

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < ND, reason="needs 8 devices (tests/conftest.py sets them up)"
)

_BYTES = {"f32": 4, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2}
_SHAPE = re.compile(r"\b(f32|f64|s32|u32|pred|bf16|f16)\[([0-9,]*)\]")


def all_reduce_bytes(hlo: str) -> int:
    """Sum of the result sizes of every all-reduce in optimized HLO text (a tuple-shaped
    all-reduce, XLA's combined form, counts each of its elements)."""
    total = 0
    for line in hlo.splitlines():
        if not re.search(r"= .*\ball-reduce(-start)?\(", line):
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dt, dims in _SHAPE.findall(result):
            total += _BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def mesh():
    return parallel.make_mesh(ND)  # jax.devices()[:8], axis "data"


def op_and_params(name):
    if name == "batch_norm":
        p = (jnp.ones(N), jnp.zeros(N))
        return (lambda x, p, **kw: jb.batch_norm(x, *p, **kw)), p
    if name == "batch_center":
        return (lambda x, b, **kw: jb.batch_center(x, b, **kw)), jnp.zeros(N)
    groups = 1 if name == "batch_inhib_g1" else 4
    p = jnp.zeros(jb.alpha_shape(N, groups))
    return (lambda x, a, **kw: jb.batch_inhib(x, a, groups=groups, **kw)), p


def compiled_bytes(name, mode, backward, masked=False):
    op, p = op_and_params(name)
    x = jnp.ones((B, N), jnp.float32)
    # masked: a row mask, an argument sharded with the rows
    extra = (jnp.arange(B) % 3 != 0,) if masked else ()

    def f(x, p, *mask, **kw):
        if mask:
            kw["mask"] = mask[0]
        if not backward:
            return op(x, p, **kw)[0]
        return jax.grad(lambda x, p: jnp.sum(op(x, p, **kw)[0] ** 2), (0, 1))(x, p)

    m = mesh()
    if mode == "shard_map":
        out_specs = P("data") if not backward else (P("data"), P())
        g = jax.shard_map(
            lambda x, p, *mask: f(x, p, *mask, axis_name="data"),
            mesh=m,
            in_specs=(P("data"), P()) + (P("data"),) * len(extra),
            out_specs=out_specs,
        )
        fn = jax.jit(g)
    else:
        fn = jax.jit(f)
        x = jax.device_put(x, NamedSharding(m, P("data")))
        p = jax.device_put(p, NamedSharding(m, P()))
        extra = tuple(jax.device_put(e, NamedSharding(m, P("data"))) for e in extra)
    return all_reduce_bytes(fn.lower(x, p, *extra).compile().as_text())


# (forward, forward + backward under shard_map, forward + backward under GSPMD), the
# table of docs/scaling.md, with the formulas it derives them from
WANT = {
    "batch_norm": (4 * (3 * N + 1), 4 * (3 * N + 1) + 4 * 4 * N, 1792),
    "batch_inhib_g1": (4 * (2 * N + 1 + N * N), 4 * (2 * N + 1 + N * N) + 4 * 2 * N * N, 33792),
    "batch_inhib_g4": (
        4 * (2 * N + 1 + N * N // 4),
        4 * (2 * N + 1 + N * N // 4) + 4 * 2 * N * N // 4,
        9216,
    ),
}


# with a mask (forward, shard_map): the count is per feature (N), and the shift is the
# first valid value of each feature, found across devices as a weighted sum and a count
# of the devices that hold one (2N); docs/scaling.md's "masked" figures
WANT_MASKED = {
    "batch_norm": 4 * (N + 2 * N + N + N),
    "batch_center": 4 * (N + 2 * N + N),
    "batch_inhib_g1": 4 * (N + 2 * N + N + N * N),  # y-only: var's psum is dead code
}


@pytest.mark.parametrize("name", list(WANT_MASKED))
def test_masked_all_reduce_bytes_match_scaling_md(name):
    assert compiled_bytes(name, "shard_map", backward=False, masked=True) == WANT_MASKED[name]


@pytest.mark.parametrize("name", list(WANT))
def test_all_reduce_bytes_match_scaling_md(name):
    fwd, fwd_bwd, gspmd = WANT[name]
    got = (
        compiled_bytes(name, "shard_map", backward=False),
        compiled_bytes(name, "shard_map", backward=True),
        compiled_bytes(name, "gspmd", backward=True),
    )
    assert got == (fwd, fwd_bwd, gspmd), (name, got)


def count_selects(fn, *args) -> int:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"= \S+ select\(", hlo))


@pytest.mark.parametrize("name", ["batch_norm", "batch_center"])
def test_selects_left_under_a_plain_vmap_over_the_parameters(name):
    """x shared, three members' parameters: the statistics are selected by the
    parameters (docs/scaling.md, "Two consequences"); XLA keeps one select of a
    per-feature vector per statistic (batch_norm's mean and var, batch_center's mean) in
    the forward that returns the statistics and none in the
    gradient of a loss of y (and none at all without the vmap). batch_inhib is left
    out: its guard has selects of its own."""
    op, p = op_and_params(name)
    ps = jax.tree.map(lambda v: jnp.stack([v, v + 0.5, v - 0.5]), p)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, N)), jnp.float32)

    def fwd(x, ps):
        return jax.vmap(lambda p: op(x, p))(ps)

    def grad(x, ps):
        return jax.grad(lambda x, ps: jnp.sum(fwd(x, ps)[0] ** 2), (0, 1))(x, ps)

    plain = (count_selects(lambda x, p: op(x, p), x, p),)
    assert plain == (0,), plain
    n_stats = 2 if name == "batch_norm" else 1
    assert (count_selects(fwd, x, ps), count_selects(grad, x, ps)) == (n_stats, 0)
