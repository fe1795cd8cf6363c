"""check_vjp: prove a hand-derived VJP against autodiff of its reference."""

from __future__ import annotations

import functools
import inspect
import numbers
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
    """A floating or complex array (not a NumPy scalar such as ``np.float32(0.5)``: like a
    Python float, that is a hyperparameter)."""
    return (
        isinstance(a, jax.Array | np.ndarray)
        and jnp.issubdtype(jnp.result_type(a), jnp.inexact)
        and not jax.dtypes.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)
    )


def _host(a):
    """``a`` as a NumPy array of float64 (complex128 for complex values)."""
    wide = np.complex128 if jnp.iscomplexobj(a) else np.float64
    if jax.config.x64_enabled:
        a = jnp.asarray(a, wide)
    return np.asarray(a, wide)


def _err(a, b):
    """``(max|a - b|, that / max|b|)``, ``a`` ours, ``b`` the reference's. Positions where
    both are the same non-finite value (NaN at a masked position on both sides, say)
    count as equal; a non-finite value of ours anywhere else gives inf."""
    a, b = _host(a), _host(b)
    if a.size == 0:
        return 0.0, 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if not np.all(np.isfinite(a) | same):
        return float("inf"), float("inf")
    diff = float(np.max(np.where(same, 0.0, np.abs(a - b))))
    finite = np.isfinite(b)
    scale = float(np.max(np.abs(b[finite]))) if finite.any() else 0.0
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
    (relative, normwise). The forward outputs are compared too (row ``"output"``: the
    output leaf farthest over its own dtype's tolerance). Complex values are compared as
    complex numbers. A position where both sides hold the same non-finite value (NaN at
    a masked position, say) counts as equal; a non-finite value of ours anywhere else
    fails.

    The op is traced first, so bad arguments get the op's own error message (the
    references do not check their arguments).

    Args:
      op, reference: functions with the same signature and output structure (checked:
        a different structure, shape or dtype is a ``ValueError``).
      *args: positional arguments; floating (or complex) arrays among them are
        differentiated, or those at ``argnums``. Python and NumPy scalars are
        hyperparameters, never differentiated. At least one input must be.
      key: an int seed >= 0 (default 0) or a PRNG key for the random cotangents.
      argnums: an int or a sequence of ints (negative ones count from the end), each
        naming a floating array argument; default: every floating array.
      rtol: relative tolerance, a float >= 0 (0.0 asks for exact agreement); None: by
        dtype (:data:`TOLERANCES`): each output leaf's own; each input's own, loosened
        to the precision of the narrowest floating output (at least float32's), since
        the ops compute in that precision (a float64 ``scale`` applied to a float32 ``x``
        gives a float32 ``y`` and a float32-accurate gradient; a float32 ``scale`` on a
        float64 ``x``, a float64 ``y`` and float64-accurate ``dx``).
      raise_on_error: raise :class:`VJPMismatch` with a table when over tolerance.
      compiler_options: XLA options for the compiled comparison, e.g.
        ``{"xla_backend_optimization_level": 0}`` to compile faster on CPU.
      **kwargs: keyword arguments for both, never differentiated; arrays of one or more
        dimensions among them (masks) are arguments of the compiled program, anything
        else is static.

    Returns:
      ``dict`` name -> :class:`VJPError`, names taken from ``reference``'s signature (an
      input named ``output``, or a repeated name, gets `` (arg i)`` appended).
    """
    if rtol is not None:
        rtol = C.epsilon("check_vjp", rtol, "rtol")
    argnums = _argnums(args, argnums)
    try:
        params = list(inspect.signature(reference).parameters)
    except (TypeError, ValueError):
        params = []
    names = []
    for i in argnums:
        name = params[i] if i < len(params) else f"arg{i}"
        # the forward's row is "output"; an input of that name (or a repeat) is told apart
        names.append(f"{name} (arg {i})" if name == "output" or name in names else name)

    def bind(fn):
        def f(*dargs):
            full = list(args)
            for i, a in zip(argnums, dargs, strict=True):
                full[i] = a
            return fn(*full, **kwargs)

        return f

    dargs = [args[i] for i in argnums]
    # the op first: its argument checks name the problem; the reference does not check
    op_shape = jax.eval_shape(bind(op), *dargs)
    out_shape = jax.eval_shape(bind(reference), *dargs)
    leaves, tree = jax.tree.flatten(out_shape)
    if jax.tree.structure(op_shape) != tree or [
        (a.shape, a.dtype) for a in jax.tree.leaves(op_shape)
    ] != [(a.shape, a.dtype) for a in leaves]:
        raise ValueError(
            "check_vjp: op and reference must return the same structure, shapes and dtypes; "
            f"got {_describe(op_shape)} from op and {_describe(out_shape)} from reference"
        )
    rng = np.random.default_rng(_seed(key))
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
    # each output leaf against its own dtype's tolerance; the row shows the leaf that is
    # farthest over it (or nearest to it)
    worst = None
    for a, b in zip(jax.tree.leaves(out_op), jax.tree.leaves(out_ref), strict=True):
        dt = jnp.result_type(b)
        ea, er = _err(a, b)
        e = VJPError(ea, er, _tol(rtol, dt), str(dt))
        if worst is None or _over(e) > _over(worst):
            worst = e
    errors["output"] = worst
    # the computation is as precise as its narrowest floating output, and at least float32:
    # a float64 scale on a float32 x gives a float32 y and a float32-accurate gradient; a
    # float32 scale on a float64 x, a float64 y and float64-accurate dx
    out_dtypes = [jnp.result_type(a) for a in leaves if jnp.issubdtype(a.dtype, jnp.inexact)]
    work = min(max((tolerance(d) for d in out_dtypes), default=0.0), tolerance(jnp.float32))
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


def _over(e: VJPError) -> float:
    """How far an error is over its tolerance (a ratio; inf for non-finite)."""
    if not np.isfinite(e.max_rel):
        return float("inf")
    return e.max_rel / e.tol if e.tol > 0 else (float("inf") if e.max_rel > 0 else 0.0)


def _describe(tree) -> str:
    return str(jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", tree))


def _seed(key) -> int:
    """The cotangents' NumPy seed from ``key``: an int seed >= 0, or a PRNG key."""
    if key is None:
        return 0
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"check_vjp: key must be an int seed >= 0 or a PRNG key; got {key}")
        return int(key)
    try:
        return int(jax.random.randint(key, (), 0, 2**31 - 1))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"check_vjp: key must be an int seed >= 0 or a PRNG key; got {key!r}"
        ) from err


def _argnums(args, argnums) -> tuple[int, ...]:
    """The differentiated positions: every floating array of ``args`` by default; an int
    or a sequence of ints (negative ones count from the end, as ``jax.grad``'s), each
    naming a floating array. No differentiated input is an error: only the forward
    would be compared."""
    n = len(args)
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_diff(a))
        if not argnums:
            raise ValueError(
                "check_vjp: no argument to differentiate: give the inputs as floating "
                "arrays (Python and NumPy scalars are hyperparameters); got "
                f"{[type(a).__name__ for a in args]}"
            )
        return argnums
    if isinstance(argnums, numbers.Integral) and not isinstance(argnums, bool):
        argnums = (argnums,)
    try:
        given = tuple(argnums)
    except TypeError:
        given = None
    if not given or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in given
    ):
        raise TypeError(f"check_vjp: argnums must be an int or a sequence of ints; got {argnums!r}")
    out = []
    for i in given:
        if not -n <= i < n:
            raise ValueError(
                f"check_vjp: argnums entry {i} is out of range for {n} positional arguments"
            )
        i = int(i) % n
        if not _is_diff(args[i]):
            got = getattr(args[i], "dtype", type(args[i]).__name__)
            raise TypeError(
                f"check_vjp: argnums entry {i} must name a floating array argument; got {got}"
            )
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"check_vjp: argnums names an argument twice; got {argnums!r}")
    return tuple(out)


def _is_array(a) -> bool:
    """A program argument: an array of at least one dimension, or a PRNG key. A 0-d array,
    like a Python or NumPy scalar, is a hyperparameter known at trace time (an
    ``epsilon`` given as ``np.array(1e-3)`` or ``jnp.float32(1e-3)``, say) and stays
    static."""
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return True
    return isinstance(a, jax.Array | np.ndarray) and a.ndim > 0


def _comparison(op, reference, args, argnums, kwargs, compiler_options):
    """The jitted program of :func:`check_vjp` (both forwards and both VJPs) and its
    non-differentiated array inputs.

    Arrays that are not differentiated (masks, PRNG keys, inputs left out of
    ``argnums``) are arguments of the program, not constants baked into it, so the
    compiled program is shared by every call with the same ``op``, ``reference``, static
    arguments and shapes (jit's own cache); compiling dominates these checks on CPU.
    Calls whose static arguments are unhashable get a program of their own. Static
    values are cached with their types, so ``axis=True`` and ``axis=1`` (equal in
    Python) do not share a program.
    """
    n = len(args)
    dyn_pos = tuple(i for i, a in enumerate(args) if i not in argnums and _is_array(a))
    static_args = tuple((i, type(a), a) for i, a in enumerate(args) if i not in argnums + dyn_pos)
    dyn_kw = tuple(sorted(k for k, v in kwargs.items() if _is_array(v)))
    static_kw = tuple(
        sorted(((k, type(v), v) for k, v in kwargs.items() if k not in dyn_kw), key=lambda t: t[0])
    )
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
            for i, _, a in static_args:
                full[i] = a
            for i, a in zip(dyn_pos, dyn[0], strict=True):
                full[i] = a
            for i, a in zip(argnums, dargs, strict=True):
                full[i] = a
            static = {k: v for k, _, v in static_kw}
            return fn(*full, **static, **dict(zip(dyn_kw, dyn[1], strict=True)))

        return f

    @functools.partial(jax.jit, compiler_options=dict(opts) or None)
    def both(dargs, dyn, ct):
        out_op, vjp_op = jax.vjp(bind(op, dyn), *dargs)
        out_ref, vjp_ref = jax.vjp(bind(reference, dyn), *dargs)
        ct_op = jax.tree.unflatten(jax.tree.structure(out_op), jax.tree.leaves(ct))
        return out_op, out_ref, vjp_op(ct_op), vjp_ref(ct)

    return both


_cached_comparison = functools.lru_cache(maxsize=256)(_build_comparison)
