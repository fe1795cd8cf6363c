"""Shape-polymorphic ``jax.export`` of the training-mode ops and modules: the batch size a
symbolic dimension ``B``, as flax's BatchNorm exports. The exported function and its
gradient (JAX differentiates through the exported call) equal the op called directly at
two batch sizes. float64, so the comparison is at round-off: the exported program is
another compilation of the same operations, its sums possibly in another order;
tolerance 1e-12 of the largest entry (measured at most 4.1e-15 in float64; in float32 the
same comparisons read up to 9.5e-7 absolute).

Before, every statistics op converted the batch size with ``int()`` (its batch-of-one
check, its count, its mask's shape; dropout's bit packing padded with ``-size % 32``):
``InconclusiveDimensionOperation: Symbolic dimension 'B' used in a context that
requires a constant``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jax_batchinhib as jb
from jax_batchinhib import linen as bnn

N = 4
KEY = jax.random.key(1)


def _ops():
    s, b = jnp.linspace(0.7, 1.3, N), jnp.linspace(-0.2, 0.3, N)
    alpha = 0.1 * jnp.ones((N, N))
    return {
        "batch_norm": lambda x: jb.batch_norm(x, s, b)[0],
        "batch_norm_two_pass": lambda x: jb.batch_norm(x, s, b, use_fast_variance=False)[0],
        "batch_norm_mask": lambda x: jb.batch_norm(x, s, b, mask=x[:, 0] > -1.0)[0],
        "batch_center": lambda x: jb.batch_center(x, b)[0],
        "batch_inhib": lambda x: jb.batch_inhib(x, alpha)[0],
        "iter_norm": lambda x: jb.iter_norm(x, s, b)[0],
        "zca_norm": lambda x: jb.zca_norm(x, s, b)[0],
        "dropout_bits": lambda x: jb.dropout(x, 0.5, KEY),
        "dropout_key_broadcast": lambda x: jb.dropout(
            x, 0.5, KEY, residual="key", broadcast_dims=(1,)
        ),  # fmt: skip
        "softmax_cross_entropy": lambda x: jb.softmax_cross_entropy(x, jax.nn.softmax(2 * x)),
    }


def _data(m):
    x = jax.random.normal(jax.random.key(m), (m, N), jnp.float64)
    return x @ (jnp.eye(N) + 0.3) + jnp.arange(N)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _loss(g):
    return lambda x: jnp.sum(jnp.sin(g(x)))


def _check_export(f, spec, sizes):
    exp = export.export(jax.jit(f))(spec)
    for m in sizes:
        x = _data(m)
        assert _rel(exp.call(x), f(x)) < 1e-12, m
        assert _rel(jax.grad(_loss(exp.call))(x), jax.grad(_loss(f))(x)) < 1e-12, m


@pytest.mark.parametrize("name", list(_ops()))
def test_ops_export_with_a_symbolic_batch(name):
    with jax.enable_x64(True):
        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"B, {N}"), jnp.float64)
        _check_export(_ops()[name], spec, (6, 9))


def test_linen_batch_norm_training_step_exports_with_a_symbolic_batch():
    """A linen BatchNorm training call (mutable batch_stats) exports as flax's does; the
    updated running statistics equal the direct call's."""
    with jax.enable_x64(True):
        x = _data(6)
        m = bnn.BatchNorm(use_running_average=False, param_dtype=jnp.float64)
        v = m.init(jax.random.key(0), x)
        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"B, {N}"), jnp.float64)
        exp = export.export(jax.jit(lambda x: m.apply(v, x, mutable=["batch_stats"])))(spec)
        for rows in (6, 9):
            x = _data(rows)
            got, want = exp.call(x), m.apply(v, x, mutable=["batch_stats"])
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert _rel(a, b) < 1e-12, rows


def test_ghost_batches_export_with_a_batch_that_is_a_multiple():
    """``virtual_batch_size`` needs the batch to be a multiple: a symbolic ``4*k`` exports;
    a bare ``B`` gets an error naming the option and the spelling that works."""
    with jax.enable_x64(True):
        s, b = jnp.linspace(0.7, 1.3, N), jnp.zeros(N)

        def f(x):
            return jb.batch_norm(x, s, b, virtual_batch_size=4)[0]

        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"4*k, {N}"), jnp.float64)
        _check_export(f, spec, (8, 12))
        bare = jax.ShapeDtypeStruct(export.symbolic_shape(f"B, {N}"), jnp.float64)
        msg = (
            r"^batch_norm: virtual_batch_size=4 must divide the batch size, which is "
            r"symbolic \(B\) and not known to be a multiple of 4; export with a multiple"
        )
        with pytest.raises(ValueError, match=msg):
            export.export(jax.jit(f))(bare)
