"""XLA options shared by the applications."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: XLA:CPU options for a program that runs once: no LLVM optimization passes, and the
#: older loop emitters for fusions instead of the MLIR fusion emitters.
CPU_RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.cache
def _supported(options: tuple) -> dict:
    """The options of ``options`` this jaxlib's XLA knows (an older one may lack the
    fusion-emitter switch; an unknown option is an error at compile time)."""
    ok = {}
    for k, v in options:
        try:
            jax.jit(lambda x: x + 1, compiler_options={k: v}).lower(jnp.zeros(())).compile()
        except Exception:  # noqa: BLE001 - XLA's "No such compile option", by type per version
            continue
        ok[k] = v
    return ok


def run_once_options() -> dict | None:
    """Compiler options for a program that runs once (an initialization, a VJP check):
    :data:`CPU_RUN_ONCE` on CPU (those this jaxlib knows), None (the platform's
    defaults) elsewhere.

    Measured on the 2-core CPU: the 92 programs of ``verify --quick`` in float64 spend
    17.8 s in XLA's backend at optimization level 0 and 6.8 s with the fusion emitters
    off as well; the example MLP's vmapped flax ``init`` compiles in 8.2 s with the
    defaults and 0.66 s at level 0. The programs compute the same operations; they run
    slower, which does not matter for one call, and their results differ at most by the
    floating-point contraction the compiler chooses.
    """
    if jax.default_backend() != "cpu":
        return None
    return dict(_supported(tuple(CPU_RUN_ONCE.items())))
