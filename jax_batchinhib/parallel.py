"""Data-parallel training over N devices: meshes, shardings, a synchronized train step.

Two ways to run one train step data-parallel, both exact (``docs/scaling.md``):

- **GSPMD** (:func:`data_parallel`; ``jax-batchinhib train --devices N`` does the same
  with its own jitted training loop over a batch placed by :func:`shard_batch`): the
  single-device step, jitted with the batch sharded along its first axis over a 1-D mesh
  and the parameters, optimizer state and running statistics replicated. The model needs
  no ``axis_name``: a batch statistic is a sum over the batch axis, which XLA's SPMD
  partitioner turns into a local sum plus an all-reduce, so every number is the one a
  single device computes on the global batch (up to the order of float additions). It
  works unchanged for any model (flax.linen.BatchNorm included), on CPU devices and on
  GPUs, and dropout masks equal the single-device ones (JAX's partitionable threefry).
- **shard_map** (:func:`shard_map_step`): the step runs per device on its shard, the
  modules are built with ``axis_name`` so that the ops sum their statistics
  (and the backward's per-feature sums) with explicit ``psum``; the gradients of the
  replicated parameters come out summed over devices (``check_vma=True``, the default).
  Explicit control over what is communicated; the model must know the axis name.

On CPU, N devices come from splitting the host (:func:`set_cpu_device_count`, before
JAX creates its CPU backend); on GPUs ``jax.devices()[:N]`` are the GPUs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_batchinhib.ops import _checks as C

DATA_AXIS = "data"


_COUNT_FLAG = "xla_force_host_platform_device_count"


def _flag_count() -> int | None:
    """The CPU device count XLA_FLAGS forces (its last ``--xla_force_host_platform_device_count``),
    or None."""
    found = re.findall(rf"--{_COUNT_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else None


def set_cpu_device_count(n: int) -> None:
    """Make the CPU backend expose ``n`` devices (XLA's host platform device count).

    Must run before JAX creates its CPU backend (before the first computation); after
    that it raises unless the process already has ``n`` or more CPU devices. It also
    raises when the count is already fixed at fewer than ``n`` devices, by JAX's
    ``jax_num_cpu_devices`` option or by ``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``; a count fixed at ``n`` or more is left as it is (a mesh takes the first
    ``n`` devices). A no-op for ``n <= 1``. GPUs are unaffected.

    Args:
      n: the number of CPU devices, an int >= 1.

    Returns:
      None.

    Raises:
      TypeError: ``n`` is not an int (a bool or a float included).
      ValueError: ``n`` < 1.
      RuntimeError: the process has, or is set to have, fewer than ``n`` CPU devices and
        it is too late, or not this function's place, to change that.
    """
    fn = "set_cpu_device_count"
    n = C.positive_int(fn, "n", n)
    if n <= 1:
        return
    configured = jax.config.jax_num_cpu_devices  # -1: not set; it overrides XLA_FLAGS
    flag = _flag_count()
    if configured >= 0:
        fixed, by = configured, f"JAX's option jax_num_cpu_devices is already {configured}"
        fix = f"set it to {n} or more instead, before any JAX computation"
    elif flag is not None:
        fixed, by = flag, f"XLA_FLAGS already has --{_COUNT_FLAG}={flag}"
        fix = f"remove it from XLA_FLAGS or make it {n} or more, before starting Python"
    else:
        fixed = None
    if fixed is not None and fixed < n:
        raise RuntimeError(f"{fn}: asked for {n} CPU devices, but {by} (fewer devices); {fix}")
    if configured >= 0:
        return
    try:
        # A count forced by XLA_FLAGS is made JAX's option too (the same count): XLA
        # reads the flag only when it creates the backend, so a flag set after that
        # changes nothing, and the option's refusal is how that case is told apart.
        jax.config.update("jax_num_cpu_devices", n if flag is None else flag)
    except RuntimeError as err:
        have = len(jax.devices("cpu"))
        if have < n:
            raise RuntimeError(
                f"{fn}: JAX's CPU backend was already created with {have} "
                f"device(s); call this (or pass --devices) before any JAX computation, or set "
                f"XLA_FLAGS=--{_COUNT_FLAG}={n} before starting Python"
            ) from err


def make_mesh(n_devices: int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over the first ``n_devices`` of ``jax.devices()`` (all when None).

    The mesh axis is of type Auto (``jax.sharding.Mesh``'s default), so jit partitions
    with GSPMD and shard_map takes arrays of any sharding.

    Args:
      n_devices: how many devices, an int >= 1, or None for all.
      axis_name: the mesh axis's name.

    Returns:
      The :class:`jax.sharding.Mesh`.
    """
    devices = jax.devices()
    if n_devices is None:
        n_devices = len(devices)
    if not C.is_int(n_devices):  # Python or NumPy ints, not bools
        raise TypeError(
            f"make_mesh: n_devices must be an int >= 1 or None; got {n_devices!r} "
            f"({type(n_devices).__name__})"
        )
    n_devices = int(n_devices)
    if n_devices < 1:
        raise ValueError(f"make_mesh: n_devices must be an int >= 1; got {n_devices!r}")
    if n_devices > len(devices):
        raise ValueError(
            f"make_mesh: n_devices={n_devices} but JAX sees {len(devices)} "
            f"{jax.default_backend()} device(s). On CPU, call "
            f"jax_batchinhib.parallel.set_cpu_device_count({n_devices}) (or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n_devices}) before JAX starts."
        )
    return Mesh(np.asarray(devices[:n_devices]), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, statistics).

    Args:
      mesh: the mesh.

    Returns:
      The replicated :class:`jax.sharding.NamedSharding`.
    """
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Split axis ``batch_axis`` of an array over the mesh's (single) axis.

    Args:
      mesh: a 1-D mesh.
      batch_axis: the array axis to split.

    Returns:
      The :class:`jax.sharding.NamedSharding`.
    """
    _check_layout("batch_sharding", mesh, batch_axis)
    return NamedSharding(mesh, P(*([None] * batch_axis), mesh.axis_names[0]))


def _check_layout(where: str, mesh, batch_axis, batch_argnums=()) -> tuple[int, ...]:
    """A 1-D mesh, an axis >= 0 and positions >= 0; returns ``batch_argnums`` as a tuple.
    (A negative axis is refused rather than counted from the end: the split is one
    PartitionSpec for every array, whose ranks may differ.)"""
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        got = f"axes {mesh.axis_names}" if isinstance(mesh, Mesh) else type(mesh).__name__
        raise ValueError(f"{where}: mesh must be a 1-D jax.sharding.Mesh; got {got}")
    if not C.is_int(batch_axis) or batch_axis < 0:
        raise ValueError(f"{where}: batch_axis must be an int >= 0; got {batch_axis!r}")
    try:
        argnums = (batch_argnums,) if C.is_int(batch_argnums) else tuple(batch_argnums)
    except TypeError:  # a bool or another non-iterable
        argnums = (batch_argnums,)
    if not all(C.is_int(i) and i >= 0 for i in argnums):
        raise ValueError(
            f"{where}: batch_argnums must be argument positions, ints >= 0; got {batch_argnums!r}"
        )
    return tuple(int(i) for i in argnums)


def _check_divisible(where: str, shape, batch_axis: int, n: int) -> None:
    if len(shape) <= batch_axis:
        raise ValueError(
            f"{where}: an array of shape {tuple(shape)} has no batch axis {batch_axis} "
            f"to split over {n} devices"
        )
    if shape[batch_axis] % n:
        raise ValueError(
            f"{where}: the batch axis {batch_axis} of an array of shape {tuple(shape)} must "
            f"split evenly over {n} devices; choose a global batch size divisible by {n}"
        )


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Place every array of ``tree`` on the mesh, split along ``batch_axis``.

    Args:
      tree: a pytree of arrays whose ``batch_axis`` divides evenly over the devices.
      mesh: a 1-D mesh.
      batch_axis: the array axis to split.

    Returns:
      The same pytree, its arrays sharded.
    """
    _check_layout("shard_batch", mesh, batch_axis)
    n = mesh.devices.size
    sharding = batch_sharding(mesh, batch_axis)

    def put(a):
        _check_divisible("shard_batch", np.shape(a), batch_axis, n)
        return jax.device_put(a, sharding)

    return jax.tree.map(put, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of the mesh.

    Args:
      tree: a pytree of arrays.
      mesh: the mesh.

    Returns:
      The same pytree, its arrays replicated: new buffers, so that donating them (as
      :func:`data_parallel` does) leaves ``tree`` usable.
    """
    # device_put keeps a jax.Array's buffer on the device it already lives on (even with
    # may_alias=False, jax 0.10 on CPU): copy first, so the donation frees only the copy
    fresh = jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, tree)
    return jax.device_put(fresh, replicated(mesh))


def _explicit(mesh: Mesh) -> bool:
    """Whether ``mesh`` types shardings (an axis of ``jax.sharding.AxisType.Explicit``)."""
    kind = getattr(jax.sharding, "AxisType", None)
    return kind is not None and kind.Explicit in tuple(getattr(mesh, "axis_types", ()))


def _on_explicit_mesh(mesh: Mesh, args, batch_argnums, batch_axis):
    """On an Explicit mesh the arguments are placed before the call (the batch split,
    the rest replicated; a plain array there would be all-gathered, every device
    computing the whole batch), and the call runs under ``jax.set_mesh`` (autodiff's
    transpose of a product over the sharded rows, a Dense kernel's gradient, takes its
    output sharding from that context)."""
    placed = tuple(
        jax.device_put(a, batch_sharding(mesh, batch_axis) if i in batch_argnums
                       else replicated(mesh))
        for i, a in enumerate(args)
    )  # fmt: skip
    return placed, jax.set_mesh(mesh)


def data_parallel(
    step: Callable, mesh: Mesh, *, batch_argnums=(1, 2), batch_axis: int = 0, donate=True
) -> Callable:
    """GSPMD data parallelism for a single-device ``step(state, *args) -> (state, out)``.

    Returns ``jit(step)`` with arguments ``batch_argnums`` split along ``batch_axis``,
    every other argument and the whole output replicated. The result equals the
    single-device step on the same global batch (up to float summation order).

    Args:
      step: the single-device train step.
      mesh: a 1-D mesh.
      batch_argnums: the positions of the arguments split over the devices.
      batch_axis: the axis of those arguments' arrays to split.
      donate: donate ``state`` (argument 0) to the jitted step.

    Returns:
      A function of ``step``'s positional arguments (keyword arguments are not
      taken: each argument's placement is by position), jitted per number of
      arguments. On a mesh of ``jax.sharding.AxisType.Explicit`` the arguments are
      placed (split or replicated) before the call and it runs under
      ``jax.set_mesh(mesh)``.
    """
    batch_argnums = _check_layout("data_parallel", mesh, batch_axis, batch_argnums)
    rep, bat = replicated(mesh), batch_sharding(mesh, batch_axis)
    n = mesh.devices.size

    # One jitted function per number of arguments (the shardings depend on it).
    cache: dict[int, Callable] = {}

    def call(*args):
        # checked here, before jit applies the shardings: an indivisible batch would
        # otherwise fail inside JAX with a message naming neither this function nor it
        for i in batch_argnums:
            for leaf in jax.tree.leaves(args[i] if i < len(args) else ()):
                _check_divisible("data_parallel", jnp.shape(leaf), batch_axis, n)
        k = len(args)
        if k not in cache:
            shard = tuple(bat if i in batch_argnums else rep for i in range(k))
            cache[k] = jax.jit(
                step,
                in_shardings=shard,
                out_shardings=rep,
                donate_argnums=(0,) if donate else (),
            )
        if _explicit(mesh):
            args, ctx = _on_explicit_mesh(mesh, args, batch_argnums, batch_axis)
            with ctx:
                return cache[k](*args)
        return cache[k](*args)

    return call


def shard_map_step(
    step: Callable, mesh: Mesh, *, batch_argnums=(1, 2), batch_axis: int = 0
) -> Callable:
    """Run ``step(state, *args) -> (state, out)`` per device with ``jax.shard_map``.

    Arguments ``batch_argnums`` are split along ``batch_axis`` (each device sees its
    shard), the rest replicated; ``state`` and ``out`` must come out identical on every
    device (``check_vma=True`` checks it at trace time: a per-device value returned
    unreduced is an error). Inside ``step``, the modules need
    ``axis_name=mesh.axis_names[0]`` and the gradients of the replicated parameters come
    out summed over the devices: write the loss as the per-device share of the global
    loss (e.g. the sum of the per-example losses over the global batch size).

    Args:
      step: the per-device train step.
      mesh: a 1-D mesh.
      batch_argnums: the positions of the arguments split over the devices.
      batch_axis: the axis of those arguments' arrays to split.

    Returns:
      A function of ``step``'s positional arguments, jitted per number of arguments
      (on an Explicit mesh, placed and run under ``jax.set_mesh`` as
      :func:`data_parallel`).
    """
    batch_argnums = _check_layout("shard_map_step", mesh, batch_axis, batch_argnums)
    name = mesh.axis_names[0]
    n = mesh.devices.size
    cache: dict[int, Callable] = {}

    def call(*args):
        k = len(args)
        for i in batch_argnums:  # a position beyond the arguments given is not split
            for leaf in jax.tree.leaves(args[i] if i < k else ()):
                _check_divisible("shard_map_step", jnp.shape(leaf), batch_axis, n)
        if k not in cache:
            bspec = P(*([None] * batch_axis), name)
            specs = tuple(bspec if i in batch_argnums else P() for i in range(k))
            f = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P())
            cache[k] = jax.jit(f)
        if _explicit(mesh):
            args, ctx = _on_explicit_mesh(mesh, args, batch_argnums, batch_axis)
            with ctx:
                return cache[k](*args)
        return cache[k](*args)

    return call
