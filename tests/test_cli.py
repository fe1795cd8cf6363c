"""The command line: verify (passes, covers every op, fails on a wrong VJP), train (learns,
writes its files), bench (forwards its flags), and both ways of starting it."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jax_batchinhib import reference as ref
from jax_batchinhib.apps import cli, verify


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------- verify


def test_verify_cases_cover_every_op_and_option():
    names = {c.name for c in verify.cases()}
    for op in (
        "batch_norm",
        "batch_center",
        "batch_norm_inference",
        "batch_center_inference",
        "batch_inhib",
        "batch_inhib_inference",
        "dropout",
        "softmax",
        "softmax_cross_entropy",
        "softmax_cross_entropy_with_integer_labels",
    ):
        assert op in names
        assert sum(c.name == op for c in verify.cases()) >= 2, f"{op}: one shape only"
    for opt in ("groups=2", 'correlation="variance"', 'denominator="abs"'):
        assert f"batch_inhib[{opt}]" in names
        assert f"batch_inhib_inference[{opt}]" in names
    assert any(len(c.shape) == 4 for c in verify.cases())  # NHWC-like input too


def test_verify_json_passes(capsys):
    """A slice of the real sweep in all three dtypes: exit 0, every error within its dtype's
    tolerance (float64 1e-10, float32 1e-4, bfloat16 2**-6), JSON well formed."""
    code, out = run_cli(
        capsys, "verify", "--quick", "--json", "--ops", "batch_inhib[groups", "softmax_cross"
    )
    assert code == 0
    d = json.loads(out)
    assert d["ok"] and d["n_failed"] == 0
    # 3 cases ("softmax_cross" also names the integer-label loss) x 3 dtypes
    assert d["n_checks"] == len(d["results"]) == 9
    assert {r["dtype"] for r in d["results"]} == {"float32", "float64", "bfloat16"}
    inputs = {
        "batch_inhib[groups=2]": {"x", "alpha"},
        "softmax_cross_entropy": {"logits", "labels"},
        "softmax_cross_entropy_with_integer_labels": {"logits"},  # integer labels: no gradient
    }
    for r in d["results"]:
        assert r["ok"]
        assert set(r["errors"]) == {"output"} | inputs[r["op"]], r["errors"]
        for k, e in r["errors"].items():
            assert 0 <= e <= r["tols"][k]
        if r["dtype"] == "float64":
            assert max(r["errors"].values()) < 1e-12  # a right rule is at round-off


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _wrong_softmax(x, axis=-1):
    return ref.softmax(x, axis)


def _wrong_fwd(x, axis):
    y = ref.softmax(x, axis)
    return y, y


def _wrong_bwd(axis, y, dy):
    return (dy * y * (1 - y),)  # the diagonal of the Jacobian only: a plausible mistake


_wrong_softmax.defvjp(_wrong_fwd, _wrong_bwd)


def test_verify_fails_on_a_wrong_vjp(capsys, monkeypatch):
    bad = verify.Case(
        "softmax_diag_only",
        lambda x, axis=-1: _wrong_softmax(x, axis),
        ref.softmax,
        (8, 5),
        verify._x_vec((8, 5), n_vec=0),
    )
    monkeypatch.setattr(verify, "cases", lambda quick=False: [bad])
    code, out = run_cli(capsys, "verify", "--dtypes", "float32")
    assert code == 1
    assert "FAIL" in out and "FAILED: 1 of 1" in out


def test_verify_table_lists_op_shape_dtype_errors_tolerance(capsys):
    code, out = run_cli(capsys, "verify", "--quick", "--ops", "dropout", "--dtypes", "float32")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("dropout"))
    assert "8x4" in row and "float32" in row and "x=" in row and "1e-04" in row
    assert row.rstrip().endswith("ok")
    assert "All 1 hand-derived VJPs agree with autodiff." in out


# -------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    argv = ["train", "--epochs", "4", "--seeds", "2", "--quiet", "--out", str(out)]
    argv += ["--variants", "batchnorm", "batchnorm+inhib_a0_abs", "two_branch"]
    assert cli.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_train_learns_the_digits(trained):
    """After 4 epochs every variant is far above chance (10%); the normalized ones > 90%
    on the held-out quarter of the digits (BatchInhib here at full strength, alpha = 0)."""
    _, d = trained
    acc = {r["variant"]: r["test_acc_per_seed"] for r in d["results"]}
    assert set(acc) == {"batchnorm", "batchnorm+inhib_a0_abs", "two_branch"}
    for name, a in acc.items():
        assert len(a) == 2
        assert min(a) > (0.9 if "batchnorm" in name else 0.6), (name, a)
    # different seeds are different runs
    assert any(len(set(map(tuple, r["curves"]["train_loss"]))) == 2 for r in d["results"])


def test_train_writes_json_plot_and_table(trained, capsys):
    out, d = trained
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert d["config"]["epochs"] == 4 and d["config"]["n_test"] == 450
    r = d["results"][0]
    assert len(r["curves"]["test_acc"]) == 2 and len(r["curves"]["test_acc"][0]) == 4
    assert r["steps_per_s"] > 0
    assert "| `batchnorm+inhib_a0_abs` |" in d["table_markdown"]
    assert any(c.startswith('BatchNorm + BatchInhib (alpha 0, "abs") vs') for c in d["comparisons"])


def test_verify_ops_that_name_no_op_is_an_error(capsys):
    """A typo in --ops would check nothing and report a pass: it is a usage error."""
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--quick", "--ops", "dropout", "batchnorm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--ops: 'batchnorm' is in no op's name" in err and "batch_norm_inference" in err
    with pytest.raises(ValueError, match="ops_filter 'batchnorm'"):
        verify.run(quick=True, ops_filter=["batchnorm"])


def test_train_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        cli.main(["train", "--epochs", "0", "--quiet", "--no-plot"])
    for lr in ("-1", "0", "nan"):
        with pytest.raises(SystemExit, match=f"--lr must be a positive number; got {lr}"):
            cli.main(["train", "--lr", lr, "--quiet", "--no-plot"])
    with pytest.raises(SystemExit, match="--lrs needs at least 2 positive values"):
        cli.main(["train", "--task", "digits", "--study", "--lrs", "0.01", "nan", "--quick"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--variants", "resnet"])
    assert "invalid choice: 'resnet'" in capsys.readouterr().err


def test_verdict_words():
    from jax_batchinhib.apps.train import verdict

    def r(accs):
        import numpy as np

        a = np.asarray(accs)
        return {"test_acc_per_seed": accs, "test_acc_mean": a.mean(), "test_acc_std": a.std(ddof=1)}

    assert verdict(r([0.95, 0.96, 0.97]), r([0.90, 0.91, 0.92]))[2] == "helps"
    assert verdict(r([0.90, 0.91, 0.92]), r([0.95, 0.96, 0.97]))[2] == "hurts"
    assert verdict(r([0.95, 0.90, 0.97]), r([0.94, 0.96, 0.92]))[2] == "ties"


# -------------------------------------------------------------------------- bench


def test_bench_forwards_its_flags(monkeypatch):
    import jax_batchinhib.apps.bench as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["bench"]) == 0
    assert cli.main(["bench", "--full", "--json", "b.json", "--markdown", "b.md"]) == 0
    assert seen == [[], ["--full", "--json", "b.json", "--markdown", "b.md"]]


# ----------------------------------------------------------------------- entry points


def test_python_dash_m_and_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "jax_batchinhib", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("jax-batchinhib ")
    script = Path(sys.executable).parent / "jax-batchinhib"
    assert script.exists(), "console script missing: pip install -e . declares it"
    res = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "{verify,train,bench}" in res.stdout


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "required" in capsys.readouterr().err


def test_wrong_rule_would_really_differ():
    """Sanity of the fixture above: the diagonal-only softmax rule is wrong."""
    x = jnp.array([[0.1, 0.5, -0.3]])
    g1 = jax.grad(lambda x: _wrong_softmax(x)[0, 0])(x)
    g2 = jax.grad(lambda x: ref.softmax(x)[0, 0])(x)
    assert float(jnp.max(jnp.abs(g1 - g2))) > 0.1
