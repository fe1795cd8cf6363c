"""The ``>>>`` examples in the package's docstrings run, and print what they say.

Every module of the package is collected (the applications included: importing them is
cheap, and their docstrings hold no example that trains or benchmarks). A module's
examples must all pass, and doctest must find every ``>>>`` line in its source, so an
example in a place doctest does not look (a private helper, a comment) fails here
rather than going unrun.
"""

import doctest
import importlib
import pkgutil

import pytest

import jax_batchinhib

MODULES = sorted(
    [jax_batchinhib.__name__]
    + [m.name for m in pkgutil.walk_packages(jax_batchinhib.__path__, "jax_batchinhib.")]
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _prompts(mod) -> int:
    """How many ``>>>`` prompts the module's source holds."""
    with open(mod.__file__, encoding="utf-8") as f:
        return sum(line.lstrip().startswith(">>>") for line in f)


def test_the_package_is_collected():
    core = {"ops.batch_norm", "ops.batch_inhib", "ops.dropout", "ops.softmax", "linen"}
    core |= {"nnx", "fold", "running", "testing", "parallel", "reference", "apps.cli"}
    assert {f"jax_batchinhib.{m}" for m in core} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=FLAGS, verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"
    assert result.attempted == _prompts(mod), (
        f"{name}: doctest ran {result.attempted} examples; the source has "
        f"{_prompts(mod)} '>>>' lines"
    )
