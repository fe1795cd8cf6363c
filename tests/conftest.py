"""Test-process setup shared by every test module.

The distributed tests (tests/test_distributed.py) need 8 devices. On a CPU-only machine
XLA can split the host into several devices; that must be decided before JAX creates its
CPU backend, so it happens here, when pytest imports this file, before any test module
imports anything that computes with jax. Each pytest-xdist worker is its own process and
imports this file itself.

``jax_num_cpu_devices`` is the JAX option for it (the config route rather than
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so that subprocesses the tests
start -- notebook kernels, the CLI -- keep their own default of one CPU device). Arrays
that are not placed explicitly still live on ``jax.devices()[0]``, so single-device tests
run exactly as before.
"""

import os

# Compile time, not run time, dominates this suite. The options of
# jax_batchinhib.apps._xla.CPU_RUN_ONCE (XLA:CPU without LLVM's optimization passes and
# without the MLIR fusion emitters) compile the suite's programs about 2.5x faster; what
# the suite checks is accuracy, never speed. The trade: the suite's programs, like
# `jax-batchinhib verify`'s, are not compiled by XLA:CPU's default fusion emitters, which
# the benchmarks and users' programs use. The options stay in XLA_FLAGS for the whole
# session, so the processes the tests start (notebook kernels, the CLI, the study's model
# processes) inherit them.
from importlib.metadata import version

from jax_batchinhib.apps._xla import CPU_RUN_ONCE  # imports jax, starts nothing

# An unknown flag in XLA_FLAGS aborts the process, so the fusion-emitter switch is passed
# only to the jaxlib this was measured with and later ones (older ones: level 0 alone).
_options = dict(CPU_RUN_ONCE)
if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 10):
    _options.pop("xla_cpu_use_fusion_emitters")
_flags = " ".join(f"--{k}={str(v).lower()}" for k, v in _options.items())
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flags}".strip()

import jax  # noqa: E402

N_CPU_DEVICES = 8

try:
    jax.config.update("jax_num_cpu_devices", N_CPU_DEVICES)
except RuntimeError as err:  # the CPU backend was created before this file was imported
    raise RuntimeError(
        "tests/conftest.py: could not give the test process "
        f"{N_CPU_DEVICES} CPU devices because the JAX backend is already initialised "
        f"({err}). Run pytest so that nothing computes with jax before conftest.py is "
        "imported, or set XLA_FLAGS=--xla_force_host_platform_device_count=8."
    ) from err

jax.devices()  # start the backend now, with the flags above

# Hypothesis profiles (tests/test_properties.py explains them): "ci", the default, draws
# the same examples every run so that a failure reproduces; "thorough" draws many more,
# at random: pytest --hypothesis-profile=thorough.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_HYPOTHESIS = dict(
    deadline=None,  # the first example of a configuration compiles
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# No shrinking in "ci": each shrink step compiles a new program (minutes on a shared CPU),
# and the failing example, printed in full, reproduces as it is.
settings.register_profile(
    "ci",
    max_examples=8,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    **_HYPOTHESIS,
)
settings.register_profile("thorough", max_examples=200, **_HYPOTHESIS)
settings.load_profile("ci")

# --dist loadscope hands each worker whole modules, in collection order. The few modules
# that take minutes go first, so that the last minutes are not one worker finishing a long
# module while the other idles (longest-first scheduling).
_HEAVY_FIRST = (
    "test_study.py",
    "test_notebooks.py",
    "test_properties.py",
    "test_distributed.py",
    "test_ops.py",
    "test_branches.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: order kept within
