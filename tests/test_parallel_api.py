"""jax_batchinhib.parallel's calling conventions: shard_map_step with fewer arguments
than its default batch_argnums, and set_cpu_device_count's argument and its refusal when
the CPU device count is already fixed at fewer devices. What changes the process's device
count (JAX creates its CPU backend once per process) runs in a fresh Python process with
a controlled environment."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib import parallel


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py)")
def test_shard_map_step_with_fewer_arguments_than_batch_argnums():
    """step(state, x) under the default batch_argnums=(1, 2): x is split, the missing
    argument 2 is not looked for (an IndexError before; data_parallel already skipped it)."""
    mesh = parallel.make_mesh(2)

    def step(state, x):
        return state + 1.0, jax.lax.psum(jnp.sum(x), parallel.DATA_AXIS)

    x = jnp.arange(8.0).reshape(4, 2)
    state, out = parallel.shard_map_step(step, mesh)(jnp.zeros(()), x)
    assert float(state) == 1.0
    np.testing.assert_allclose(out, jnp.sum(x))
    # the divisibility check still covers the arguments that are given
    with pytest.raises(ValueError, match=r"shard_map_step: the batch axis 0 .*\(3, 2\)"):
        parallel.shard_map_step(step, mesh)(jnp.zeros(()), jnp.ones((3, 2)))


@pytest.mark.parametrize("bad", [True, 2.0, "2", None])
def test_set_cpu_device_count_wrong_type_is_a_type_error(bad):
    """The wrong type is a TypeError (it was a ValueError), checked before any global
    state is touched."""
    with pytest.raises(TypeError, match=r"set_cpu_device_count: n must be an int >= 1; got"):
        parallel.set_cpu_device_count(bad)


def _run(code, xla_flags=None):
    """``code`` in a fresh Python process on CPU, with only ``xla_flags`` (if any) in
    XLA_FLAGS; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


_ATTEMPT = """
import jax
from jax_batchinhib import parallel

def attempt(n):
    try:
        parallel.set_cpu_device_count(n)
    except RuntimeError as e:
        print("RuntimeError:", e)
    else:
        print("ok", n)
"""


def test_set_cpu_device_count_refuses_a_smaller_count_fixed_by_xla_flags():
    """XLA_FLAGS forces 2 CPU devices: asking for 4 raises (it returned silently and left
    2 devices); asking for 2 or fewer is fine, and the process has the 2 devices."""
    out = _run(
        _ATTEMPT + "attempt(4)\nattempt(2)\nattempt(1)\nprint('devices', len(jax.devices()))",
        "--xla_force_host_platform_device_count=2",
    )
    assert (
        "RuntimeError: set_cpu_device_count: asked for 4 CPU devices, but XLA_FLAGS already "
        "has --xla_force_host_platform_device_count=2 (fewer devices); remove it from "
        "XLA_FLAGS or make it 4 or more, before starting Python"
    ) in out, out
    assert "ok 2\nok 1\ndevices 2" in out, out


def test_set_cpu_device_count_refuses_a_smaller_count_fixed_by_jax_config():
    """jax_num_cpu_devices=2 set before: asking for 4 raises; before any computation and
    after the backend exists alike. With nothing fixed it sets the count, and once the
    backend exists asking for more than it has raises."""
    out = _run(
        _ATTEMPT
        + "jax.config.update('jax_num_cpu_devices', 2)\nattempt(4)\n"
        + "print('devices', len(jax.devices()))\nattempt(4)\nattempt(2)"
    )
    want = (
        "RuntimeError: set_cpu_device_count: asked for 4 CPU devices, but JAX's option "
        "jax_num_cpu_devices is already 2 (fewer devices); set it to 4 or more instead"
    )
    assert out.count(want) == 2, out
    assert "devices 2" in out and out.rstrip().endswith("ok 2"), out
    out = _run(_ATTEMPT + "attempt(3)\nprint('devices', len(jax.devices()))")
    assert "ok 3\ndevices 3" in out, out
    out = _run(_ATTEMPT + "jax.devices()\nattempt(4)")
    assert "JAX's CPU backend was already created with 1 device(s)" in out, out
