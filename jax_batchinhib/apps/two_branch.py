r"""The two-branch network, its backward chained by hand, rule by rule.

Derivation: docs/derivations.md, section 6.

The network (:class:`jax_batchinhib.apps.models.TwoBranch`), batch of ``m`` rows, row-major
(``x`` is ``(m, d)``, a Dense layer is ``z = x W + b`` with ``W`` of shape ``(in, out)``
as linen stores it):

.. code-block:: text

    branch A:  x1A = x W1A + b1A        z1A = sin(x1A)
               zDP = z1A ⊙ M            M = keep / (1 - p)       (dropout; 0 at p = 1)
               yA  = zDP W2A + b2A
    branch B:  x1B = x W1B              μ = (1/m) Σ_rows x1B
               xBN = x1B - μ + c                                  (batch centering)
    head:      zBN = [ReLU(xBN), yA]    x2B = zBN W2B + b2B
               L   = (1/m) Σ_rows CE(softmax(x2B), t)

:func:`grads_by_hand` runs it forward and back, one line per rule (the seed's own order:
softmax cross-entropy, FC_2B, concat, ReLU, batch centering, FC_1B; FC_2A, dropout, sin,
FC_1A). Where the original derivation is wrong, the line follows the correct derivation and
the comment says what the seed wrote (see ``docs/derivations.md``):

- ``dW = (input)ᵀ · d(output)``: the seed writes ``(y_B - ŷ_B) z_BN``, ``(y_B - ŷ_B) θ_2B``
  without transposes (the shapes do not even agree for a batch).
- batch centering: ``dx1B = dxBN - mean_rows(dxBN)``; the seed's ``dxBN (1 - 1/m)`` keeps
  only each row's own term of the mean and drops every other row's.
- FC_2A's weight gradient uses its input ``zDP``, not its output ``z2A``.
- ``dzDP = dz2A W2Aᵀ``; the seed writes ``dz2A - θ_2A``.
- ``dz2A`` is only what flows back from the head (the seed adds a branch-A loss term
  ``y - ŷ_A``, but the network has no output on branch A).
- FC_1A's weight gradient uses ``x``, not ``x1A``.

:func:`grads_autodiff` is ``jax.grad`` of the same loss through the Flax model, which
uses the library's custom VJPs; ``tests/test_two_branch.py`` checks that the two agree for
every parameter to float64 round-off.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_batchinhib.ops import softmax_cross_entropy

Params = dict[str, Any]


def forward(params: Params, x, keep, rate: float):
    """The forward pass of the two-branch network written out; returns ``(logits, cache)``
    where ``cache`` holds every intermediate the backward needs."""
    p = params
    # dropout's multiplier (seed: M_j = 1/(1-p) or 0); at p = 1 every unit is dropped and
    # M is 0 (keep / (1 - p) would be 0/0), as the Dropout layer does
    if rate == 1.0:
        M = jnp.zeros(keep.shape, x.dtype)
    else:
        M = keep.astype(x.dtype) / (1.0 - rate)
    x1A = x @ p["fc1a"]["kernel"] + p["fc1a"]["bias"]
    z1A = jnp.sin(x1A)
    zDP = z1A * M
    yA = zDP @ p["fc2a"]["kernel"] + p["fc2a"]["bias"]
    x1B = x @ p["fc1b"]["kernel"]
    mu = jnp.mean(x1B, axis=0)
    xBN = x1B - mu + p["center"]["bias"]
    zBN = jnp.concatenate([jax.nn.relu(xBN), yA], axis=-1)
    x2B = zBN @ p["fc2b"]["kernel"] + p["fc2b"]["bias"]
    cache = dict(x=x, M=M, x1A=x1A, zDP=zDP, xBN=xBN, zBN=zBN, x2B=x2B)
    return x2B, cache


def grads_by_hand(params: Params, x, labels, keep, rate: float):
    """Loss and the gradient of every parameter, chained by hand.

    Args:
      params: ``{'fc1a': {'kernel', 'bias'}, 'fc2a': {...}, 'fc1b': {'kernel'},
        'center': {'bias'}, 'fc2b': {...}}`` (the ``params`` collection of
        :class:`~jax_batchinhib.apps.models.TwoBranch`).
      x: ``(m, d)`` inputs.
      labels: ``(m, K)`` one-hot (or probability) targets.
      keep: ``(m, features_a)`` boolean dropout keep-mask (see :func:`dropout_keep_mask`).
      rate: the dropout rate.

    Returns:
      ``(loss, grads)`` with ``grads`` shaped like ``params``.
    """
    p = params
    x2B, c = forward(params, x, keep, rate)
    m = x.shape[0]
    nb = p["fc1b"]["kernel"].shape[1]
    loss = jnp.mean(softmax_cross_entropy(x2B, labels))

    # softmax cross-entropy, averaged over the batch: dL/dx2B = (y_B - ŷ_B) / m
    yB = jax.nn.softmax(x2B, axis=-1)
    dx2B = (yB * jnp.sum(labels, -1, keepdims=True) - labels) / m
    # FC_2B (x2B = zBN W2B + b2B): seed writes (y_B - ŷ_B) z_BN, no transpose
    dW2B = c["zBN"].T @ dx2B
    db2B = jnp.sum(dx2B, axis=0)
    dzBN = dx2B @ p["fc2b"]["kernel"].T  # seed: (y_B - ŷ_B) θ_2B, no transpose
    # concat: split the gradient back into the two branches
    dReLU, dyA = dzBN[:, :nb], dzBN[:, nb:]
    # ReLU
    dxBN = dReLU * (c["xBN"] > 0)
    # batch centering (xBN = x1B - mean_rows(x1B) + c)
    dc = jnp.sum(dxBN, axis=0)
    dx1B = dxBN - jnp.mean(dxBN, axis=0)  # seed: dxBN (1 - 1/m), wrong for m > 1
    # FC_1B (x1B = x W1B)
    dW1B = c["x"].T @ dx1B  # seed: dL/dx1B · η (η undefined; x, transposed)
    # FC_2A (yA = zDP W2A + b2A): dz2A is only what the head sends back
    dz2A = dyA  # seed adds (y - ŷ_A), a loss on branch A that the network does not have
    dW2A = c["zDP"].T @ dz2A  # seed: dL/dz2A · z2A (the layer's output, not its input)
    db2A = jnp.sum(dz2A, axis=0)
    dzDP = dz2A @ p["fc2a"]["kernel"].T  # seed: dL/dz2A - θ_2A
    # dropout
    dz1A = dzDP * c["M"]
    # sin
    dx1A = dz1A * jnp.cos(c["x1A"])
    # FC_1A (x1A = x W1A + b1A)
    dW1A = c["x"].T @ dx1A  # seed: dL/dx1A · x1A
    db1A = jnp.sum(dx1A, axis=0)

    grads = {
        "fc1a": {"kernel": dW1A, "bias": db1A},
        "fc2a": {"kernel": dW2A, "bias": db2A},
        "fc1b": {"kernel": dW1B},
        "center": {"bias": dc},
        "fc2b": {"kernel": dW2B, "bias": db2B},
    }
    return loss, grads


def dropout_keep_mask(model: nn.Module, variables, x, rngs):
    """The keep-mask that ``model``'s Dropout draws when applied with ``rngs`` in training.

    Runs the model once with an interceptor that draws the Dropout module's key with
    ``make_rng`` (its first draw, as the module itself would), passes that key to the
    module explicitly, and records ``keep_mask(key, rate, shape)``, the op's own mask.
    Returns ``(keep, logits)``; ``logits`` equal an uninstrumented apply's.
    """
    from jax_batchinhib import linen as bl
    from jax_batchinhib.ops.dropout import keep_mask

    found = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, bl.Dropout) and context.method_name == "__call__":
            key = mod.make_rng(mod.rng_collection)
            found.append(keep_mask(key, mod.rate, args[0].shape))
            return next_fun(*args, **{**kwargs, "rng": key})
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits, _ = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    if len(found) != 1:
        raise ValueError(f"dropout_keep_mask: expected one Dropout call; saw {len(found)}")
    return found[0], logits


def loss_autodiff(params, model: nn.Module, variables, x, labels, rngs):
    """Mean softmax cross-entropy of the Flax model in training mode (the library's ops
    inside; ``jax.grad`` of this uses their hand-derived VJPs)."""
    logits, _ = model.apply(
        {**variables, "params": params}, x, train=True, rngs=rngs, mutable=["batch_stats"]
    )
    return jnp.mean(softmax_cross_entropy(logits, labels))


def grads_autodiff(model: nn.Module, variables, x, labels, rngs):
    """``(loss, grads)`` by ``jax.value_and_grad`` through the Flax model."""
    return jax.value_and_grad(loss_autodiff)(variables["params"], model, variables, x, labels, rngs)
