"""One validator per argument, called with the caller's name.

The ops, the reference, the running-statistics steps and the linen and NNX modules all
call these, so the same bad value gets the same exception and the same text from each
(up to the caller's name before the colon). The rule for the exception type:

- ``TypeError``: the value has the wrong type, including a ``bool`` where a number is
  expected and a tracer where a Python value known at trace time is needed;
- ``ValueError``: the type is right but the value is not (out of range, wrong shape, not
  one of the choices).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import export


def dim(s):
    """A dimension as a Python int, or as it is when symbolic (shape-polymorphic
    ``jax.export``, where a batch size is a name such as ``B``)."""
    return s if export.is_symbolic_dim(s) else int(s)


def shape_str(shape) -> str:
    return "(" + ", ".join(str(dim(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def concrete_0d(v) -> bool:
    """A 0-d NumPy array or a concrete (not traced) 0-d JAX array."""
    return (
        isinstance(v, jax.Array | np.ndarray) and not isinstance(v, jax.core.Tracer) and v.ndim == 0
    )


def plain(v):
    """A NumPy scalar (``np.float32(0.9)``, ``np.int64(3)``) or a concrete 0-d floating
    NumPy or JAX array (``np.array(0.9)``, ``jnp.float32(0.9)``, which the float
    hyperparameters accept, as flax's do) as the Python scalar it holds; anything else
    (a tracer included) as it is. The NNX modules store hyperparameters through this: a
    JAX array kept on the module would be NNX state, traced by ``nnx.jit``."""
    if isinstance(v, np.generic):
        return v.item()
    if concrete_0d(v) and jnp.issubdtype(v.dtype, jnp.floating):
        return v.item()
    return v


def _is_bool(v) -> bool:
    return isinstance(v, bool | np.bool_)


def is_int(v) -> bool:
    """A Python or NumPy integer, not a bool (what an axis, a count or ``groups`` may be)."""
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def _static_number(fn: str, name: str, v, expect: str) -> float:
    """``v`` as a Python float; TypeError for a tracer, a bool or a non-number. NumPy
    scalars (``np.float32(0.9)``, ``np.int64(3)``), 0-d NumPy arrays (``np.array(0.9)``)
    and concrete 0-d JAX arrays (``jnp.float32(0.9)``) count as numbers, as in flax;
    other arrays do not (a hyperparameter is a value known at trace time)."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{fn}: {name} must be a Python float known at trace time; got a tracer. Close "
            f"over it or mark it static in jax.jit."
        )
    if concrete_0d(v) and not jnp.issubdtype(v.dtype, jnp.bool_):
        v = v.item()
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be {expect}; got {v!r}")
    return float(v)


def dtype_of(fn: str, name: str, x):
    """``x``'s dtype; a list or another non-array is a TypeError naming ``fn`` and
    ``name`` (jax.numpy refuses lists too, but JAX's error names neither)."""
    try:
        return jnp.result_type(x)
    except TypeError:
        raise TypeError(
            f"{fn}: {name} must be an array (a jax.Array or numpy.ndarray); got "
            f"{type(x).__name__}"
            + (". Convert it with jnp.asarray" if isinstance(x, list | tuple) else "")
        ) from None


def float_array(fn: str, name: str, x) -> None:
    """``x`` must be a floating-point array (TypeError otherwise)."""
    dtype = dtype_of(fn, name, x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: {name} must be a floating-point array (float16, bfloat16, float32 or "
            f"float64); got dtype {dtype}. Cast it first, e.g. {name}.astype(jnp.float32)."
        )


def axis(
    fn: str,
    ax,
    ndim: int,
    name: str = "x",
    role: str = "one feature axis; statistics reduce over every other axis",
) -> int:
    """The axis ``ax`` of the argument ``name`` (``ndim`` dimensions) as a non-negative
    int; ``role`` says in the TypeError what the axis is for."""
    if not is_int(ax):
        raise TypeError(f"{fn}: axis must be an int ({role}); got {ax!r}")
    if ndim < 1:
        raise ValueError(f"{fn}: {name} must have at least one dimension; got a scalar")
    if not -ndim <= ax < ndim:
        raise ValueError(
            f"{fn}: axis {ax} is out of range for {name} with {ndim} dimensions; "
            f"expected an int in [{-ndim}, {ndim - 1}]"
        )
    return int(ax) % ndim


def vector(fn: str, name: str, v, n: int) -> None:
    """A per-feature vector: None, or a float array of shape ``(n,)``."""
    if v is None:
        return
    float_array(fn, name, v)
    shape = jnp.shape(v)
    if shape != (n,):
        raise ValueError(
            f"{fn}: {name} must have shape ({n},) for x with {n} features; got {shape_str(shape)}"
        )


def epsilon(fn: str, v, name: str = "epsilon") -> float:
    """A finite Python float >= 0 known at trace time (``epsilon``)."""
    f = _static_number(fn, name, v, "a finite float >= 0")
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"{fn}: {name} must be a finite float >= 0; got {v!r}")
    return f


def positive_epsilon(fn: str, v, why: str) -> float:
    """``epsilon`` that must be > 0 (a finite Python float known at trace time): 0 and
    negative values get the same "> 0" message, with ``why`` it must be positive."""
    f = _static_number(fn, "epsilon", v, "a finite float > 0")
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{fn}: epsilon must be > 0 and finite ({why}); got {v!r}")
    return f


def positive(fn: str, name: str, v, why: str = "") -> float:
    """A finite Python float > 0 known at trace time (``rho``, ``guard``)."""
    f = _static_number(fn, name, v, "a finite float > 0")
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{fn}: {name} must be a finite float > 0{why}; got {v!r}")
    return f


def rho(fn: str, v) -> float:
    """``rho``: the sharpness of g(a) = softplus(rho a)/rho, a float > 0."""
    return positive(fn, "rho", v)


def choice(fn: str, name: str, v, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices`` (``correlation``, ``denominator``, ``guard_mode``)."""
    if not isinstance(v, str):
        raise TypeError(f"{fn}: {name} must be one of {choices}; got {v!r}")
    if v not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}; got {v!r}")
    return v


def guard(fn: str, v, default: float) -> float:
    """``guard`` δ > 0; None gives ``default`` (the guard mode's)."""
    if v is None:
        return float(default)
    return positive(fn, "guard", v, " (it bounds 1/denominator)")


def positive_int(fn: str, name: str, v) -> int:
    """An int >= 1 (``groups``, ``num_features``, ``virtual_batch_size``): Python's, or a
    NumPy integer (what ``np.prod`` returns)."""
    if not is_int(v):
        raise TypeError(f"{fn}: {name} must be an int >= 1; got {v!r}")
    if v < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1; got {v!r}")
    return int(v)


def groups(fn: str, v, n: int | None = None) -> int:
    """``groups``: an int >= 1 that divides the number of features ``n`` (when known)."""
    g = positive_int(fn, "groups", v)
    if n is not None and n % g:
        raise ValueError(
            f"{fn}: groups={g} must divide the number of features N={n}; "
            f"choose groups among the divisors of {n}"
        )
    return g


def virtual_batch_size(fn: str, v) -> int | None:
    """``virtual_batch_size``: None or an int >= 1 (that it divides the batch is checked
    on the batch)."""
    return None if v is None else positive_int(fn, "virtual_batch_size", v)


def flag(fn: str, name: str, v) -> bool:
    """A bool (``use_fast_variance``, ``unbiased``, ...): Python's or NumPy's."""
    if not _is_bool(v):
        raise TypeError(f"{fn}: {name} must be a bool (True or False); got {v!r}")
    return bool(v)


def mask_dtype(fn: str, mask) -> None:
    """A mask must be boolean (or integer 0/1); None passes."""
    if mask is None:
        return
    dtype = dtype_of(fn, "mask", mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(
            f"{fn}: mask must be a boolean array (or integer 0/1); got dtype {dtype}. A mask "
            f"selects, it does not weight: pass mask != 0 (what flax makes of a numeric mask)."
        )


def momentum(fn: str, v) -> float | None:
    """``momentum``: None (cumulative average) or a float in [0, 1]."""
    if v is None:
        return None
    f = _static_number(fn, "momentum", v, "a float in [0, 1] or None (cumulative average)")
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise ValueError(
            f"{fn}: momentum must be a float in [0, 1] or None (cumulative average); "
            f"got {v!r}. Note: PyTorch's momentum p is our 1 - p."
        )
    return f


def rate(fn: str, v) -> float:
    """Dropout ``rate``: a Python float in [0, 1] known at trace time."""
    f = _static_number(fn, "rate", v, "a float in [0, 1]")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{fn}: rate must be a float in [0, 1]; got {v!r}")
    return f


def num_features(fn: str, v) -> int:
    """``num_features`` of an NNX layer: an int >= 1."""
    return positive_int(fn, "num_features", v)
