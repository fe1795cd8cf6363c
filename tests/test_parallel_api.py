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


def test_set_cpu_device_count_sees_a_flag_set_after_the_backend():
    """XLA_FLAGS gains the device-count flag after the CPU backend exists (with 1
    device): XLA never reads it, and asking for 4 devices returned silently. It now
    raises; with the flag set before the backend, the process has the flag's count."""
    out = _run(
        _ATTEMPT
        + "import os\njax.devices()\n"
        + "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'\nattempt(4)"
    )
    assert "JAX's CPU backend was already created with 1 device(s)" in out, out
    out = _run(
        _ATTEMPT
        + "import os\nos.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'\n"
        + "attempt(4)\nprint('devices', len(jax.devices()))\nattempt(3)"
    )
    assert "ok 4\ndevices 4\nok 3" in out, out


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py)")
def test_layout_arguments_are_checked_by_name():
    """A negative batch_axis split axis 0 while the divisibility check read the last one
    (shard_map_step ran, on the wrong split); a negative position in batch_argnums was
    checked and never split; an int batch_argnums, a string axis and a 2-D mesh failed
    deep inside Python or JAX; a scalar leaf was told to change its batch size."""
    mesh = parallel.make_mesh(2)
    step = parallel.shard_map_step  # the four entry points share the checks
    for fn, args in (
        (parallel.shard_batch, (jnp.ones((2, 4)), mesh)),
        (parallel.batch_sharding, (mesh,)),
        (lambda *a, **k: parallel.data_parallel(lambda s, x: (s, x), *a, **k), (mesh,)),
        (lambda *a, **k: step(lambda s, x: (s, x), *a, **k), (mesh,)),
    ):
        with pytest.raises(ValueError, match=r"batch_axis must be an int >= 0; got -1"):
            fn(*args, batch_axis=-1)
        with pytest.raises(ValueError, match=r"batch_axis must be an int >= 0; got '0'"):
            fn(*args, batch_axis="0")
    with pytest.raises(ValueError, match=r"data_parallel: batch_argnums must be argument"):
        parallel.data_parallel(lambda s, x: (s, x), mesh, batch_argnums=(-1,))
    # a bool is no position (it was "'bool' object is not iterable")
    with pytest.raises(ValueError, match=r"data_parallel: batch_argnums must be .* got True"):
        parallel.data_parallel(lambda s, x: (s, x), mesh, batch_argnums=True)
    # a NumPy int is an int, as everywhere else in the library
    assert parallel.make_mesh(np.int64(2)).devices.size == 2
    # an int is one position, as jax's argnums
    dp = parallel.data_parallel(lambda s, x: (s, jnp.sum(x)), mesh, batch_argnums=1)
    assert float(dp(jnp.zeros(()), jnp.ones((4, 2)))[1]) == 8.0
    mesh2d = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("a", "b"))
    with pytest.raises(ValueError, match=r"shard_batch: mesh must be a 1-D .*got axes"):
        parallel.shard_batch(jnp.ones((4, 2)), mesh2d)
    with pytest.raises(ValueError, match=r"an array of shape \(\) has no batch axis 0"):
        parallel.shard_batch(jnp.ones(()), mesh)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py)")
def test_replicate_then_donate_leaves_the_original():
    """replicate() shared its first device's buffer with the array it was given, so
    data_parallel's donation of the replicated state deleted the caller's original."""
    mesh = parallel.make_mesh(2)
    state = {"w": jnp.ones((3,))}
    dp = parallel.data_parallel(lambda s, x: ({"w": s["w"] + jnp.sum(x)}, None), mesh)
    new, _ = dp(parallel.replicate(state, mesh), jnp.ones((4, 1)))
    assert not state["w"].is_deleted()
    np.testing.assert_allclose(state["w"], 1.0)
    np.testing.assert_allclose(new["w"], 5.0)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (tests/conftest.py)")
@pytest.mark.parametrize("entry", ["data_parallel", "shard_map_step"])
def test_explicit_mesh_steps_split_the_batch(entry):
    """A mesh of jax.sharding.AxisType.Explicit given by the user: data_parallel ran the
    step on the whole batch on every device when the batch came as a plain array (an
    all-gather before the first product), and shard_map_step refused it; batch_norm
    inside failed outside jax.set_mesh. Now the step sees its batch split over the
    devices, and the result is the Auto mesh's."""
    import jax_batchinhib as jb

    x = jnp.arange(32.0).reshape(16, 2) % 7
    seen = []

    def step(s, x):
        seen.append(jax.typeof(x).sharding.spec)
        y = jb.batch_norm(x, s, s)[0]
        loss = jnp.sum(y * jnp.cos(x))
        if entry == "shard_map_step":  # per device: the global sum
            return s, jax.lax.psum(loss, "data")
        return s, loss

    outs = []
    for kind in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mesh = jax.make_mesh((4,), ("data",), axis_types=(kind,), devices=jax.devices()[:4])
        make = getattr(parallel, entry)
        kw = {"donate": False} if entry == "data_parallel" else {}
        outs.append(make(step, mesh, batch_argnums=1, **kw)(jnp.ones(2), x)[1])
    if entry == "data_parallel":
        assert seen[-1] == jax.sharding.PartitionSpec("data", None), seen
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6)
