"""Inverted dropout with a hand-derived VJP that regenerates its mask from the key."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_batchinhib.ops import _checks as C
from jax_batchinhib.ops import _stats as S


def _check_rate(fn, rate):
    return C.rate(fn, rate)


def _check_key(fn, key):
    if key is None:
        raise ValueError(f"{fn}: key is required for rate in (0, 1); got None")
    dtype = jnp.result_type(key)
    if not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32):
        raise TypeError(
            f"{fn}: key must be a PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)); "
            f"got an array of dtype {dtype}"
        )


def keep_mask(key, rate: float, shape):
    """The boolean keep-mask that :func:`dropout` draws for ``key``, ``rate`` and ``shape``."""
    return jax.random.bernoulli(key, 1.0 - rate, shape)


def dropout(x, rate: float, key):
    r"""Inverted dropout (seed 001): :math:`y = x \odot M`, :math:`M_j = [r_j > p]/(1-p)`.

    Backward: :math:`dx = dy \odot M`. The mask is not stored: the backward regenerates it
    from ``key``, so nothing input-sized is kept (autodiff keeps the mask).
    ``rate=0`` returns ``x``; ``rate=1`` returns zeros with a zero (not NaN) gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_batchinhib import dropout
      >>> y = dropout(jnp.ones((2, 4)), 0.5, jax.random.key(0))
      >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
      True
    """
    fn = "dropout"
    S.check_float(fn, "x", x)
    rate = _check_rate(fn, rate)
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    _check_key(fn, key)
    return _dropout(rate, x, key)


def _dropout_apply(rate, x, dy_or_x, key):
    keep = keep_mask(key, rate, x.shape)
    scale = jnp.asarray(1.0 / (1.0 - rate), S.compute_dtype(x.dtype))
    v = dy_or_x.astype(scale.dtype) * scale
    return jnp.where(keep, v, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dropout(rate, x, key):
    return _dropout_apply(rate, x, x, key)


def _dropout_fwd(rate, x, key):
    # Residuals: the key and a zero-size array carrying x's dtype (dy has x's shape).
    return _dropout(rate, x, key), (jnp.zeros((0,), x.dtype), key)


def _dropout_bwd(rate, res, dy):
    x0, key = res
    like = jax.ShapeDtypeStruct(dy.shape, x0.dtype)
    return _dropout_apply(rate, like, dy, key), None


_dropout.defvjp(_dropout_fwd, _dropout_bwd)
