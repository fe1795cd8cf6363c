"""check_vjp: prove a hand-derived VJP against autodiff of its reference."""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_batchinhib.ops import _checks as C

#: Default relative tolerance per dtype: ``max|ours - autodiff| / max|autodiff|``.
#: float64 and float32 are the project's targets; float16 and bfloat16 are two
#: units of their round-off (2**-10, 2**-7 relative), since both sides compute in float32
#: and round once to the input dtype at the end.
TOLERANCES = {
    jnp.dtype(jnp.float64): 1e-10,
    jnp.dtype(jnp.float32): 1e-4,
    jnp.dtype(jnp.float16): 2.0**-9,
    jnp.dtype(jnp.bfloat16): 2.0**-6,
}


class VJPError(NamedTuple):
    """Error of one input's cotangent (or of the forward output, name ``"output"``).

    Attributes:
      max_abs: ``max|ours - autodiff|``.
      max_rel: ``max_abs / max|autodiff|`` (``max_abs`` when autodiff is all zero; inf
        when ours is not finite).
      tol: the tolerance ``max_rel`` is held to.
      dtype: the input's dtype, as a string.
    """

    max_abs: float
    max_rel: float
    tol: float
    dtype: str

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_rel) and self.max_rel <= self.tol)


class VJPMismatch(AssertionError):
    """Raised by :func:`check_vjp` when an error is over its tolerance.

    Attributes:
      errors: the ``{name: VJPError}`` dict of the failed check.
    """

    def __init__(self, message: str, errors: dict):
        super().__init__(message)
        self.errors = errors


def tolerance(dtype) -> float:
    """The default relative tolerance of :func:`check_vjp` for ``dtype``.

    Args:
      dtype: a floating dtype.

    Returns:
      ``TOLERANCES[dtype]``, or 1e-4 for a dtype not listed there.
    """
    return TOLERANCES.get(jnp.dtype(dtype), 1e-4)


def _tol(rtol, dtype) -> float:
    """``rtol`` as given (0.0 included), or the dtype's default when None."""
    return tolerance(dtype) if rtol is None else rtol


def _is_diff(a) -> bool:
    return (
        a is not None
        and hasattr(a, "dtype")
        and jnp.issubdtype(jnp.result_type(a), jnp.floating)
        and not jax.dtypes.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)
    )


def _err(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float64) if jax.config.x64_enabled else a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    if not np.all(np.isfinite(a)):
        return float("inf"), float("inf")
    rel = diff / scale if scale > 0 else diff
    return diff, rel


def format_table(errors: dict, title: str = "") -> str:
    """The errors of :func:`check_vjp` as a fixed-width text table.

    Args:
      errors: ``{name: VJPError}``, as :func:`check_vjp` returns.
      title: an optional first line.

    Returns:
      The table, one row per input.
    """
    rows = [f"{'input':>10} {'dtype':>9} {'max abs':>11} {'max rel':>11} {'tol':>9}  ok"]
    for name, e in errors.items():
        rows.append(
            f"{name:>10} {e.dtype:>9} {e.max_abs:11.3e} {e.max_rel:11.3e} {e.tol:9.1e}  "
            f"{'yes' if e.ok else 'NO'}"
        )
    return (title + "\n" if title else "") + "\n".join(rows)


def check_vjp(
    op,
    reference,
    *args,
    key=None,
    argnums=None,
    rtol=None,
    raise_on_error=True,
    compiler_options=None,
    **kwargs,
):
    """Compare ``op``'s VJP with ``jax.vjp`` of ``reference`` for every differentiable input.

    Both are called as ``f(*args, **kwargs)``. Random normal cotangents (drawn from
    ``key``, the same for both) are pulled back through each; the error for each input
    is ``max|ours - autodiff|`` (absolute) and that divided by ``max|autodiff|``
    (relative, normwise). The forward outputs are compared too (row ``"output"``).

    Args:
      op, reference: functions with the same signature and output structure.
      *args: positional arguments; floating arrays among them are differentiated
        (or those at ``argnums``).
      key: an int seed (default 0) or a PRNG key for the random cotangents.
      rtol: relative tolerance, a float >= 0 (0.0 asks for exact agreement); None: by
        dtype (:data:`TOLERANCES`): each input's own, loosened to float32's when another
        differentiated input is float32 or narrower, since the ops compute in the
        narrower input's precision, at least float32 (a float64 ``scale`` applied to
        a float32 ``x`` gets a float32-accurate gradient); the output's by its dtype.
      raise_on_error: raise :class:`VJPMismatch` with a table when over tolerance.
      compiler_options: XLA options for the compiled comparison, e.g.
        ``{"xla_backend_optimization_level": 0}`` to compile faster on CPU.
      **kwargs: static keyword arguments for both.

    Returns:
      ``dict`` name -> :class:`VJPError`, names taken from ``reference``'s signature.
    """
    if rtol is not None:
        rtol = C.epsilon("check_vjp", rtol, "rtol")
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_diff(a))
    argnums = tuple(argnums)
    try:
        params = list(inspect.signature(reference).parameters)
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"arg{i}" for i in argnums]

    def bind(fn):
        def f(*dargs):
            full = list(args)
            for i, a in zip(argnums, dargs, strict=True):
                full[i] = a
            return fn(*full, **kwargs)

        return f

    dargs = [args[i] for i in argnums]
    out_shape = jax.eval_shape(bind(reference), *dargs)
    leaves, tree = jax.tree.flatten(out_shape)
    if key is None:
        key = 0
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1)) if not isinstance(key, int) else key
    rng = np.random.default_rng(seed)
    cts = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            cts.append(jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype))
        else:
            cts.append(np.zeros(leaf.shape, jax.dtypes.float0))
    ct = jax.tree.unflatten(tree, cts)

    both, dyn = _comparison(op, reference, args, argnums, kwargs, compiler_options)
    out_op, out_ref, g_op, g_ref = both(dargs, dyn, ct)

    errors = {}
    out_dtype = jnp.result_type(jax.tree.leaves(out_ref)[0])
    oa, orl = 0.0, 0.0
    for a, b in zip(jax.tree.leaves(out_op), jax.tree.leaves(out_ref), strict=True):
        ea, er = _err(a, b)
        oa, orl = max(oa, ea), max(orl, er)
    errors["output"] = VJPError(oa, orl, _tol(rtol, out_dtype), str(out_dtype))
    # the computation is no more precise than its narrowest input, and at least float32
    floating = [
        jnp.result_type(x) for x in dargs if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    work = min(max((tolerance(d) for d in floating), default=0.0), tolerance(jnp.float32))
    for name, a, b, x in zip(names, g_op, g_ref, dargs, strict=True):
        ea, er = _err(a, b)
        dt = jnp.result_type(x)
        tol = rtol if rtol is not None else max(tolerance(dt), work)
        errors[name] = VJPError(ea, er, tol, str(dt))
    if raise_on_error and not all(e.ok for e in errors.values()):
        op_name = getattr(op, "__name__", repr(op))
        raise VJPMismatch(
            format_table(errors, f"check_vjp: {op_name} differs from autodiff of its reference"),
            errors,
        )
    return errors


def _is_array(a) -> bool:
    return isinstance(a, jax.Array | np.ndarray)


def _comparison(op, reference, args, argnums, kwargs, compiler_options):
    """The jitted program of :func:`check_vjp` (both forwards and both VJPs) and its
    non-differentiated array inputs.

    Arrays that are not differentiated (masks, PRNG keys, inputs left out of
    ``argnums``) are arguments of the program, not constants baked into it, so the
    compiled program is shared by every call with the same ``op``, ``reference``, static
    arguments and shapes (jit's own cache); compiling dominates these checks on CPU.
    Calls whose static arguments are unhashable get a program of their own.
    """
    n = len(args)
    dyn_pos = tuple(i for i, a in enumerate(args) if i not in argnums and _is_array(a))
    static_args = tuple((i, a) for i, a in enumerate(args) if i not in argnums + dyn_pos)
    dyn_kw = tuple(sorted(k for k, v in kwargs.items() if _is_array(v)))
    static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dyn_kw))
    opts = tuple(sorted((compiler_options or {}).items()))
    dyn = ([args[i] for i in dyn_pos], [kwargs[k] for k in dyn_kw])
    spec = (op, reference, n, argnums, static_args, dyn_pos, static_kw, dyn_kw, opts)
    try:
        hash(spec)
    except TypeError:
        return _build_comparison(*spec), dyn
    return _cached_comparison(*spec), dyn


def _build_comparison(op, reference, n, argnums, static_args, dyn_pos, static_kw, dyn_kw, opts):
    def bind(fn, dyn):
        def f(*dargs):
            full = [None] * n
            for i, a in static_args:
                full[i] = a
            for i, a in zip(dyn_pos, dyn[0], strict=True):
                full[i] = a
            for i, a in zip(argnums, dargs, strict=True):
                full[i] = a
            return fn(*full, **dict(static_kw), **dict(zip(dyn_kw, dyn[1], strict=True)))

        return f

    @functools.partial(jax.jit, compiler_options=dict(opts) or None)
    def both(dargs, dyn, ct):
        out_op, vjp_op = jax.vjp(bind(op, dyn), *dargs)
        out_ref, vjp_ref = jax.vjp(bind(reference, dyn), *dargs)
        ct_op = jax.tree.unflatten(jax.tree.structure(out_op), jax.tree.leaves(ct))
        return out_op, out_ref, vjp_op(ct_op), vjp_ref(ct)

    return both


_cached_comparison = functools.lru_cache(maxsize=256)(_build_comparison)
