"""The op, the linen module and the NNX module refuse the same bad value with the same
exception type and the same text, up to the caller's name before the colon (one
validator per argument, ``jax_batchinhib/ops/_checks.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_batchinhib as jbi
from jax_batchinhib import linen as bnn
from jax_batchinhib import nnx as bnx

N = 4
X = jax.random.normal(jax.random.key(0), (8, N))
ALPHA = jnp.zeros((N, N))


def _error(fn):
    """(exception type, caller name, message after the caller's name) of ``fn()``."""
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    text = str(info.value).split("\n")[0]
    caller, _, rest = text.partition(": ")
    return type(info.value), caller, rest


def _traced(make):
    """Run ``make(value)`` under jax.jit, so that ``value`` is a tracer."""
    return lambda: jax.jit(make)(1.0)


# (name, op call, linen call, NNX call); each gets one bad value.
CASES = {
    "guard=0": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, guard=0),
        linen=lambda: bnn.BatchInhib(use_running_average=False, guard=0).init(jax.random.key(1), X),
        nnx=lambda: bnx.BatchInhib(N, guard=0, rngs=nnx.Rngs(0)),
    ),
    "rho=True": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, rho=True),
        linen=lambda: bnn.BatchInhib(use_running_average=False, rho=True).init(
            jax.random.key(1), X
        ),
        nnx=lambda: bnx.BatchInhib(N, rho=True, rngs=nnx.Rngs(0)),
    ),
    "traced rho": dict(
        op=_traced(lambda r: jbi.batch_inhib(X, ALPHA, rho=r)[0]),
        linen=_traced(
            lambda r: bnn.BatchInhib(use_running_average=False, rho=r).init(jax.random.key(1), X)
        ),
        nnx=_traced(lambda r: bnx.BatchInhib(N, rho=r, rngs=nnx.Rngs(0)).alpha[...]),
    ),
    "traced epsilon": dict(
        op=_traced(lambda e: jbi.batch_inhib(X, ALPHA, epsilon=e)[0]),
        linen=_traced(
            lambda e: bnn.BatchInhib(use_running_average=False, epsilon=e).init(
                jax.random.key(1), X
            )
        ),
        nnx=_traced(lambda e: bnx.BatchInhib(N, epsilon=e, rngs=nnx.Rngs(0)).alpha[...]),
    ),
    "batch_norm traced epsilon": dict(
        op=_traced(lambda e: jbi.batch_norm(X, epsilon=e)[0]),
        linen=_traced(
            lambda e: bnn.BatchNorm(use_running_average=False, epsilon=e).init(jax.random.key(1), X)
        ),
        nnx=_traced(lambda e: bnx.BatchNorm(N, epsilon=e, rngs=nnx.Rngs(0)).mean[...]),
    ),
    "axis out of range": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, axis=2),
        linen=lambda: bnn.BatchInhib(use_running_average=False, axis=2).init(jax.random.key(1), X),
        nnx=lambda: bnx.BatchInhib(N, axis=2, rngs=nnx.Rngs(0))(X),
    ),
    "axis not an int": dict(
        op=lambda: jbi.batch_norm(X, axis=1.5),
        linen=lambda: bnn.BatchNorm(use_running_average=False, axis=1.5).init(jax.random.key(1), X),
        nnx=lambda: bnx.BatchNorm(N, axis=1.5, rngs=nnx.Rngs(0))(X),
    ),
    "groups do not divide N": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, groups=3),
        linen=lambda: bnn.BatchInhib(use_running_average=False, groups=3).init(
            jax.random.key(1), X
        ),
        nnx=lambda: bnx.BatchInhib(N, groups=3, rngs=nnx.Rngs(0)),
    ),
    "groups=0": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, groups=0),
        linen=lambda: bnn.BatchInhib(use_running_average=False, groups=0).init(
            jax.random.key(1), X
        ),
        nnx=lambda: bnx.BatchInhib(N, groups=0, rngs=nnx.Rngs(0)),
    ),
    "guard_mode": dict(
        op=lambda: jbi.batch_inhib(X, ALPHA, guard_mode="soft"),
        linen=lambda: bnn.BatchInhib(use_running_average=False, guard_mode="soft").init(
            jax.random.key(1), X
        ),
        nnx=lambda: bnx.BatchInhib(N, guard_mode="soft", rngs=nnx.Rngs(0)),
    ),
    "use_fast_variance=1": dict(
        op=lambda: jbi.batch_norm(X, use_fast_variance=1),
        linen=lambda: bnn.BatchNorm(use_running_average=False, use_fast_variance=1).init(
            jax.random.key(1), X
        ),
        nnx=lambda: bnx.BatchNorm(N, use_fast_variance=1, rngs=nnx.Rngs(0)),
    ),
    # the modules promote an integer x to floating point (flax's dtype policy); a complex
    # x is refused by all three
    "complex x": dict(
        op=lambda: jbi.batch_center(jnp.ones((8, N), jnp.complex64)),
        linen=lambda: bnn.BatchCenter(use_running_average=False).init(
            jax.random.key(1), jnp.ones((8, N), jnp.complex64)
        ),
        nnx=lambda: bnx.BatchCenter(N, rngs=nnx.Rngs(0))(jnp.ones((8, N), jnp.complex64)),
    ),
}

#: The exception type each case must raise (TypeError: wrong type, bool as a number,
#: a tracer where a Python value is needed; ValueError: wrong value).
EXPECTED = {
    "guard=0": ValueError,
    "rho=True": TypeError,
    "traced rho": TypeError,
    "traced epsilon": TypeError,
    "batch_norm traced epsilon": TypeError,
    "axis out of range": ValueError,
    "axis not an int": TypeError,
    "groups do not divide N": ValueError,
    "groups=0": ValueError,
    "guard_mode": ValueError,
    "use_fast_variance=1": TypeError,
    "complex x": TypeError,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_and_modules_raise_the_same_error(case):
    calls = CASES[case]
    op_type, op_name, op_text = _error(calls["op"])
    assert op_name.startswith(("batch_", "softmax", "dropout")), op_name
    assert op_type is EXPECTED[case], (op_type, op_text)
    for family in ("linen", "nnx"):
        typ, name, text = _error(calls[family])
        assert name.startswith(("BatchNorm", "BatchCenter", "BatchInhib")), (family, name)
        assert (typ, text) == (op_type, op_text), (family, typ, text, op_type, op_text)


def test_momentum_and_rate_agree_between_the_families():
    for bad, typ in ((True, TypeError), (1.5, ValueError)):
        errs = [
            _error(
                lambda b=bad: bnn.BatchNorm(use_running_average=False, momentum=b).init(
                    jax.random.key(1), X
                )
            ),
            _error(lambda b=bad: bnx.BatchNorm(N, momentum=b, rngs=nnx.Rngs(0))),
        ]
        assert {(e[0], e[2]) for e in errs} == {(typ, errs[0][2])}
        errs = [
            _error(lambda b=bad: jbi.dropout(X, b, jax.random.key(0))),
            _error(lambda b=bad: bnn.Dropout(b, deterministic=False).init(jax.random.key(1), X)),
            _error(lambda b=bad: bnx.Dropout(b, rngs=nnx.Rngs(0))),
        ]
        assert {(e[0], e[2]) for e in errs} == {(typ, errs[0][2])}


def test_running_step_checks_its_flags_and_momentum():
    """running.Step, the functional steps' options, took "False" for eval mode, "no" for
    unbiased=True and momentum 1.5 / -1 / nan / True (diverging, NaN or frozen running
    statistics): refused now with the modules' messages."""
    from jax_batchinhib import running

    for bad, err in ((1.5, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                     (True, TypeError)):  # fmt: skip
        with pytest.raises(err, match=r"running.Step: momentum must be a float in \[0, 1\]"):
            running.Step(False, momentum=bad)
    with pytest.raises(TypeError, match=r"running.Step: use_running_average must be a bool"):
        running.Step("False")
    with pytest.raises(TypeError, match=r"running.Step: unbiased must be a bool .* got 'no'"):
        running.Step(False, unbiased="no")
    assert running.Step(np.bool_(True), momentum=np.float32(0.9)).momentum == pytest.approx(0.9)


def test_running_step_checks_the_state_it_is_given():
    """A state that does not fit the layer: another layer's (no var) failed with
    AttributeError, one of another width with a reshape error naming neither, and a
    scalar count under an element mask silently became per-feature."""
    from jax_batchinhib import running

    x = jnp.arange(12.0).reshape(4, 3)

    def step(state, momentum=0.99, mask=None):
        return running.batch_norm_step(
            "BN", x, None, None, state, running.Step(False, momentum=momentum),
            epsilon=1e-5, mask=mask,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"BN: the running state needs var for this layer; "
                       r"got a RunningStats with mean"):  # fmt: skip
        step(running.RunningStats(mean=jnp.zeros(3)))
    with pytest.raises(ValueError, match=r"BN: the running mean has shape \(4,\), but this "
                       r"batch's mean has 3 values"):  # fmt: skip
        step(running.RunningStats(mean=jnp.zeros(4), var=jnp.ones(4)))
    with pytest.raises(ValueError, match=r"BN: the running state needs count"):
        step(running.RunningStats(mean=jnp.zeros(3), var=jnp.ones(3)), momentum=None)
    scalar = running.RunningStats(jnp.zeros(3), jnp.ones(3), count=jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match=r"BN: the running count has shape \(\), but this "
                       r"batch counts per position of shape \(3,\)"):  # fmt: skip
        step(scalar, momentum=None, mask=jnp.ones((4, 3), bool))
    per_feature = scalar._replace(count=jnp.zeros(3, jnp.int32))
    _, new = step(per_feature, momentum=None, mask=jnp.ones((4, 3), bool))
    np.testing.assert_array_equal(new.count, [1, 1, 1])
