"""The command line: verify (passes, covers every op, fails on a wrong VJP), train (learns,
writes its files), bench (forwards its flags), and both ways of starting it."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib import reference as ref
from jax_batchinhib.apps import cli, study, verify


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def usage_error(capsys, *argv):
    """Run the CLI on ``argv``: it must stop with argparse's usage error (exit status 2;
    on stderr the subcommand's usage, then ``jax-batchinhib CMD: error: ...``). Returns
    stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: jax-batchinhib {argv[0]} "), err
    assert f"\njax-batchinhib {argv[0]}: error: argument --" in err, err
    return err


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """Nothing may be trained, generated, timed or written: each of those fails the test.
    The working folder is ``tmp_path`` (the default --out folders would be made there)."""
    from jax_batchinhib.apps import bench, study, train

    def fail(*a, **k):
        pytest.fail("a bad option value must stop the command before this runs")

    for mod, name in [
        (train, "run"),
        (train, "main"),
        (study, "run_study"),
        (study, "load_task"),
        (study, "main"),
        (study, "write_merged"),
        (study, "merge_main"),
        (bench, "run"),
        (bench, "scaling"),
        (bench, "train_step_memory"),
    ]:
        monkeypatch.setattr(mod, name, fail, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
    assert "8x4" in row and "float32" in row and "x=" in row and "1.0e-04" in row
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


def test_train_rejects_bad_flags(capsys, no_training):
    err = usage_error(capsys, "train", "--epochs", "0", "--quiet", "--no-plot")
    assert "argument --epochs: must be >= 1; got 0" in err
    for lr in ("-1", "0", "nan"):
        err = usage_error(capsys, "train", "--lr", lr, "--quiet", "--no-plot")
        assert f"argument --lr: must be a positive number; got {float(lr)}" in err
    err = usage_error(
        capsys, "train", "--task", "digits", "--study", "--lrs", "0.01", "nan", "--quick"
    )
    assert "argument --lrs: needs at least 2 positive values; got [0.01, nan]" in err
    err = usage_error(capsys, "train", "--variants", "resnet")
    assert "argument --variants: invalid choice: 'resnet'" in err


# ------------------------------------------------------------- bad option values


def test_study_batch_size_larger_than_the_rows_is_a_usage_error(capsys, no_training):
    """A study batch larger than the rows the learning-rate search trains on was a
    ZeroDivisionError after the data was made; it is a usage error, found from the row
    counts alone (MNIST-1D is not generated)."""
    err = usage_error(
        capsys, "train", "--task", "digits", "--study", "--quick", "--batch-size", "2000"
    )
    assert "argument --batch-size: 2000 is larger than the 1010 rows" in err
    assert "--task digits --quick: 1347 training rows" in err
    err = usage_error(capsys, "train", "--task", "mnist1d", "--quick", "--batch-size", "601")
    assert "argument --batch-size: 601 is larger than the 600 rows" in err
    err = usage_error(capsys, "train", "--task", "mnist1d", "--batch-size", "3001")
    assert "3001 is larger than the 3000 rows" in err and "4000 training rows" in err
    assert list(no_training.iterdir()) == []  # no output folder either


STUDY_ONLY_OPTIONS = [
    ["--model", "mlp"],
    ["--lrs", "0.01", "0.1"],
    ["--steps", "10"],
    ["--eval-every", "5"],
    ["--val-seeds", "2"],
    ["--quick"],
    ["--jobs", "2"],
    ["--merge", "results.json"],
]


@pytest.mark.parametrize("option", STUDY_ONLY_OPTIONS, ids=lambda o: o[0])
def test_study_options_without_the_study_are_usage_errors(capsys, no_training, option):
    """Every option of the "study" group was silently ignored by --task digits without
    --study."""
    assert {o[0][2:].replace("-", "_") for o in STUDY_ONLY_OPTIONS} == set(cli.STUDY_ONLY)
    for task in ([], ["--task", "digits"]):
        err = usage_error(capsys, "train", *task, *option)
        assert f"argument {option[0]}: applies to the study (--task mnist1d, or --task " in err
        assert "got it with --task digits without --study" in err


@pytest.mark.parametrize("option", [["--epochs", "3"], ["--lr", "0.01"], ["--devices", "2"]])
def test_digits_options_in_the_study_are_usage_errors(capsys, no_training, option):
    """--epochs, --lr and --devices were silently ignored by the study (it trains for
    --steps, at the learning rate it chooses from --lrs, on one device per model)."""
    for task in (["--task", "mnist1d"], ["--task", "digits", "--study"]):
        err = usage_error(capsys, "train", *task, "--quick", *option)
        assert f"argument {option[0]}: applies to --task digits without --study only" in err
        assert "got it with the study" in err


def test_unwritable_out_is_a_usage_error_before_training(capsys, no_training):
    """An --out that cannot be a folder was found only when the results were written,
    after training."""
    (no_training / "a_file").write_text("x")
    for mode in ([], ["--task", "mnist1d", "--quick"], ["--task", "digits", "--study"]):
        err = usage_error(capsys, "train", *mode, "--out", "a_file/out")
        assert "argument --out: expected a folder that can be created and written to; " in err
        assert "got 'a_file/out' ('a_file' is a file)" in err
        err = usage_error(capsys, "train", *mode, "--out", "a_file")
        assert "got 'a_file' ('a_file' is a file)" in err


def test_read_only_out_is_a_usage_error(capsys, monkeypatch, no_training):
    ro = no_training / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: the folder refuses as it would a user

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    try:
        for mode in ([], ["--task", "mnist1d", "--quick"]):
            err = usage_error(capsys, "train", *mode, "--out", "ro")
            assert "got 'ro' (cannot write in 'ro': Permission denied)" in err
    finally:
        ro.chmod(0o700)


def test_the_up_front_check_of_out_creates_nothing(monkeypatch, tmp_path):
    """A missing --out (nested) passes the check and is not created by it: the training
    creates it when it writes (a run stopped by a later usage error left empty folders)."""
    from jax_batchinhib.apps import train

    seen = []
    monkeypatch.setattr(train, "main", lambda args: seen.append(args.out) or 0)
    out = tmp_path / "a" / "b"
    assert cli.main(["train", "--out", str(out)]) == 0
    assert seen == [str(out)] and not (tmp_path / "a").exists()


def test_digits_batch_size_is_checked_against_the_data_and_devices(capsys, no_training):
    """A batch larger than the digits' 1347 training rows, or not divisible by --devices,
    was a traceback once training started."""
    err = usage_error(capsys, "train", "--batch-size", "1348")
    assert "argument --batch-size: must be at most the 1347 training rows" in err
    assert "got 1348" in err
    err = usage_error(capsys, "train", "--batch-size", "63", "--devices", "2")
    assert "argument --batch-size: must be divisible by --devices 2" in err and "got 63" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0"], "argument --seeds: must be >= 1; got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1; got 0"),
        (["--devices", "0"], "argument --devices: must be >= 1; got 0"),
        (["--task", "mnist1d", "--seeds", "0"], "argument --seeds: must be >= 1; got 0"),
        (["--task", "mnist1d", "--steps", "0"], "argument --steps: must be >= 1; got 0"),
        (["--task", "mnist1d", "--eval-every", "-1"], "argument --eval-every: must be >= 1"),
        (["--task", "mnist1d", "--val-seeds", "0"], "argument --val-seeds: must be >= 1"),
        (["--task", "mnist1d", "--jobs", "0"], "argument --jobs: must be >= 1; got 0"),
        (["--task", "digits", "--study", "--model", "cnn"], "argument --model: --task digits"),
        (["--task", "mnist1d", "--variants", "bn", "zz"], "argument --variants: invalid choice"),
        (
            ["--task", "mnist1d", "--lrs", "0.01", "0.01"],
            "argument --lrs: the values must be distinct; got [0.01, 0.01]",
        ),
        (
            ["--task", "mnist1d", "--steps", "30", "--eval-every", "100"],
            "argument --eval-every: at most the number of steps (30); got 100",
        ),
        (
            ["--task", "mnist1d", "--model", "mlp", "--variants", "bn+bi_abs_abs_a0_g5"],
            "argument --variants: bn+bi_abs_abs_a0_g5 runs on the CNN only; got --model mlp",
        ),
    ],
)
def test_range_errors_are_usage_errors(capsys, no_training, argv, message):
    """They were SystemExit("train: ...") (exit status 1, no usage)."""
    assert message in usage_error(capsys, "train", *argv)


def test_study_needs_two_seeds(capsys, no_training):
    """One seed gave an infinite confidence interval (Infinity in results.json)."""
    for task in (["--task", "mnist1d"], ["--task", "digits", "--study"]):
        err = usage_error(capsys, "train", *task, "--quick", "--seeds", "1")
        assert "argument --seeds: " in err and "needs at least 2 seeds; got 1" in err


DOCS_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _split_study(tmp_path):
    """The committed digits study split into two runs (bn in both), as --merge takes."""
    d = json.loads((DOCS_RESULTS / "digits_results.json").read_text())
    paths = []
    for i, keep in enumerate((lambda j: j < 5, lambda j: j >= 5 or j == 2)):
        part = json.loads(json.dumps(d))
        for m in part["models"].values():
            m["variants"] = [r for j, r in enumerate(m["variants"]) if keep(j)]
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(part))
    return d, [str(p) for p in paths]


def test_merge_errors_name_the_file(capsys, no_training):
    """A missing, unreadable or foreign file, or runs of different tasks or settings,
    was a traceback; each is a usage error naming the file."""
    tmp = no_training
    _, (a, b) = _split_study(tmp)
    digits = ["train", "--task", "digits", "--study", "--merge"]
    err = usage_error(capsys, *digits, a, "missing.json")
    assert "argument --merge: missing.json: no such file" in err
    (tmp / "notes.txt").write_text("not json")
    err = usage_error(capsys, *digits, a, "notes.txt")
    assert "argument --merge: notes.txt is not a JSON file" in err
    (tmp / "train.json").write_text(json.dumps({"config": {}, "results": []}))
    err = usage_error(capsys, *digits, a, "train.json")
    assert "argument --merge: train.json is not the results.json of a study" in err
    err = usage_error(capsys, *digits, a, str(tmp))
    assert f"argument --merge: {tmp} is a folder" in err
    mnist = str(DOCS_RESULTS / "mnist1d_results.json")
    err = usage_error(capsys, *digits, a, mnist)
    assert f"argument --merge: {mnist} is a --task mnist1d study; expected --task digits" in err
    err = usage_error(capsys, "train", "--task", "mnist1d", "--merge", mnist, a)
    assert f"argument --merge: {a} is a --task digits study; expected --task mnist1d" in err
    other = json.loads(Path(b).read_text())
    other["config"]["steps"] = 7
    Path(b).write_text(json.dumps(other))
    err = usage_error(capsys, *digits, a, b)
    assert f"argument --merge: {b} and {a} ran with different settings (steps 7 vs 600)" in err
    other["config"]["steps"] = 600
    other["models"]["mlp"]["variants"][0]["test_acc_per_seed"][0] += 0.01  # bn, run twice
    Path(b).write_text(json.dumps(other))
    err = usage_error(capsys, *digits, a, b)
    assert f"argument --merge: mlp bn differs between {a} and {b}" in err
    err = usage_error(capsys, *digits, a, a, "--seeds", "3")
    assert "argument --seeds: not allowed with --merge, which trains nothing" in err
    assert list(tmp.glob("out*")) == []


def test_merge_refuses_runs_it_cannot_compare(capsys, no_training):
    """A merge without the baseline labelled every row "baseline"; a NaN accuracy made
    Holm's correction call every other variant a tie; seed counts that differ were
    broadcast or failed without naming the variant; runs of --quick and full data, or of
    different --eval-every, merged. Each is now a usage error naming what is wrong."""
    tmp = no_training
    d, (a, b) = _split_study(tmp)
    digits = ["train", "--task", "digits", "--study", "--merge"]

    def edited(name, edit):
        part = json.loads(Path(b).read_text())
        edit(part["config"], part["models"]["mlp"]["variants"])
        path = tmp / name
        path.write_text(json.dumps(part))
        return str(path)

    no_bn = edited("no_bn.json", lambda c, v: v.pop(0))
    err = usage_error(capsys, *digits, no_bn)
    assert "argument --merge: no run has the baseline bn on the mlp" in err
    nan = edited("nan.json", lambda c, v: v[-1]["test_acc_per_seed"].__setitem__(0, math.nan))
    err = usage_error(capsys, *digits, a, nan)
    assert (
        "argument --merge: mlp zca against bn: paired_difference: accuracies must be finite" in err
    )
    short = edited("short.json", lambda c, v: v[-1]["test_acc_per_seed"].pop())
    err = usage_error(capsys, *digits, a, short)
    assert "mlp zca against bn: paired_difference: the two runs must have one accuracy per " in err
    assert "got 9 and 10" in err
    quick = edited("quick.json", lambda c, v: c.__setitem__("quick", True))
    err = usage_error(capsys, *digits, a, quick)
    assert "ran with different settings (quick True vs False)" in err
    every = edited("every.json", lambda c, v: c.__setitem__("eval_every", 50))
    err = usage_error(capsys, *digits, a, every)
    assert "ran with different settings (eval_every 50 vs 100)" in err
    assert list(tmp.glob("out*")) == []


def test_merge_keeps_the_baseline_row_with_every_learning_rate(capsys, tmp_path):
    """The baseline run twice, once without its seeds at every grid value (an older run):
    the merge kept whichever came first, so the order of the files decided whether the
    same-learning-rate comparison was made."""
    d, (a, b) = _split_study(tmp_path)
    part = json.loads(Path(a).read_text())
    del part["models"]["mlp"]["variants"][2]["test_acc_per_seed_per_lr"]  # bn
    Path(a).write_text(json.dumps(part))
    for order in ((a, b), (b, a)):
        merged = study.merge([json.loads(Path(f).read_text()) for f in order])
        assert merged["table_markdown"] == d["table_markdown"]
        assert merged["config"]["variants"] == d["config"]["variants"]


def test_merge_honours_no_plot_and_says_what_it_wrote(capsys, tmp_path):
    """--merge wrote the PNGs whatever --no-plot said, and printed no "wrote" line."""
    d, (a, b) = _split_study(tmp_path)
    out = tmp_path / "merged"
    argv = ["train", "--task", "digits", "--study", "--merge", a, b, "--out", str(out)]
    code, printed = run_cli(capsys, *argv, "--no-plot")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert printed.rstrip().endswith(f"wrote {out / 'results.json'}")
    m = json.loads((out / "results.json").read_text())
    assert m["table_markdown"] == d["table_markdown"]  # the split study, whole again
    assert m["table_markdown"] in printed
    out2 = tmp_path / "merged2"
    code, printed = run_cli(capsys, *argv[:-1], str(out2))
    assert code == 0
    pngs = [out2 / "accuracy.png", out2 / "curves.png"]
    assert printed.rstrip().endswith("wrote " + ", ".join(map(str, [out2 / "results.json", *pngs])))
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_help_tells_the_study_defaults_from_its_settings(capsys, monkeypatch):
    """--seeds said "study: 8" when the study ran 5 (4 with --quick); the help now reads
    the study's DEFAULTS and QUICK."""
    from jax_batchinhib.apps import study

    def train_help():
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    text = train_help()
    assert "study: 8" not in text
    seeds = study.DEFAULTS["mnist1d"]["seeds"]
    assert f"study: at least 2, default {seeds} ({study.QUICK['seeds']} with --quick)" in text
    assert "default 1500 on mnist1d, 600 on digits (40 with --quick)" in text
    assert "(study: 100 on mnist1d, 64 on digits)" in text
    monkeypatch.setitem(study.QUICK, "seeds", 9)
    monkeypatch.setitem(study.DEFAULTS["digits"], "batch_size", 32)
    text = train_help()
    assert f"default {seeds} (9 with --quick)" in text
    assert "(study: 100 on mnist1d, 32 on digits)" in text


@pytest.mark.parametrize("argv", [[], ["train"], ["verify"], ["bench"]])
def test_help_has_no_literal_double_percent(capsys, argv):
    """argparse does not %-format a description: "95%%" was printed as is."""
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "%%" not in out and "%(" not in out
    if argv == ["train"]:
        assert "(paired 95% CI)" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--repeats", "-1"], "argument --repeats: must be >= 1; got -1"),
        (["--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
        (["--scaling", "--repeats", "0"], "argument --repeats: must be >= 1; got 0"),
        (["--min-time", "-0.5"], "argument --min-time: must be a positive number of seconds"),
        (["--min-time", "0"], "argument --min-time: must be a positive number of seconds"),
        (["--min-time", "inf"], "argument --min-time: must be a positive number of seconds"),
        (["--case-budget", "-3"], "argument --case-budget: must be a positive number"),
        (["--case-budget", "nan"], "argument --case-budget: must be a positive number"),
        (["--max-steps", "0"], "argument --max-steps: must be >= 1; got 0"),
        (["--workers", "0"], "argument --workers: must be >= 1; got 0"),
        (["--unroll", "0"], "argument --unroll: must be >= 1; got 0"),
        (["--runs", "0"], "argument --runs: must be >= 1; got 0"),
        (["--cases", "nope/*"], "argument --cases: ['nope/*'] matched no case"),
        (["--json", "."], "argument --json: expected a file in a folder"),
        (["--plot", "p.png"], "argument --plot: applies with --scaling only"),
    ],
)
def test_bench_rejects_bad_timing_settings(capsys, no_training, argv, message):
    """Negative --repeats / --min-time / --case-budget were accepted and recorded (and 0
    silently meant the default); --runs 0 and an unknown case exited with status 1."""
    err = usage_error(capsys, "bench", *argv)
    assert message in err


def test_bench_output_folder_is_checked_first(capsys, no_training):
    (no_training / "a_file").write_text("x")
    err = usage_error(capsys, "bench", "--json", "a_file/r.json")
    assert "argument --json: " in err and "got 'a_file/r.json' ('a_file' is a file)" in err
    err = usage_error(capsys, "bench", "--markdown", "a_file/r.md")
    assert "argument --markdown: " in err
    # a good --json beside a bad --markdown: the run stops and creates no folder
    err = usage_error(capsys, "bench", "--json", "new/sub/r.json", "--markdown", "a_file/r.md")
    assert "argument --markdown: " in err and not (no_training / "new").exists()


def test_bench_writers_create_the_folders(tmp_path):
    """What check_args no longer creates, the writers do."""
    from jax_batchinhib.apps import bench

    path = tmp_path / "a" / "b" / "r.json"
    bench.write_json({"x": 1}, str(path))
    assert json.loads(path.read_text()) == {"x": 1}


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


def test_devices_beyond_a_count_fixed_by_xla_flags_is_a_usage_error(tmp_path):
    """XLA_FLAGS already forces 2 host devices: --devices 4 cannot be had, and the CLI
    says so as a usage error (parallel.set_cpu_device_count raised a traceback)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    res = subprocess.run(
        [sys.executable, "-m", "jax_batchinhib", "train", "--devices", "4", "--out", "o"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 2, res.stderr
    assert "jax-batchinhib train: error: argument --devices:" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------- output folder, batch size, variants


def test_empty_out_is_a_usage_error(capsys, no_training):
    """--out "" passed the check ("" read as ".") and os.makedirs("") failed after the
    run had trained; it is a usage error in every mode, as bench's --json "" is."""
    _, (a, b) = _split_study(no_training)
    for mode in (
        ["--variants", "none", "--epochs", "1", "--seeds", "1"],
        ["--task", "digits", "--study", "--quick"],
        ["--task", "mnist1d", "--quick"],
        ["--task", "digits", "--study", "--merge", a, b],
    ):
        for out in ("", "  "):
            err = usage_error(capsys, "train", *mode, "--quiet", "--no-plot", "--out", out)
            assert f"argument --out: expected a folder path; got {out!r}" in err


def test_output_files_that_are_folders_are_usage_errors(capsys, no_training):
    """A folder where the run writes results.json or a figure was an IsADirectoryError
    after training; each file the mode writes is checked with --out."""
    out = no_training / "o"
    cases = [
        ([], "results.json"),
        ([], "curves.png"),
        (["--task", "mnist1d", "--quick"], "results.partial.json.cnn"),
        (["--task", "mnist1d", "--quick"], "inhib_mlp.png"),
        (["--task", "digits", "--study", "--quick"], "accuracy.png"),
    ]
    for mode, name in cases:
        (out / name).mkdir(parents=True)
        err = usage_error(capsys, "train", *mode, "--out", str(out))
        assert f"argument --out: expected a folder that {name} can be written in; " in err
        assert f"got {str(out)!r} ({str(out / name)!r} is a folder)" in err
        (out / name).rmdir()
    _, (a, b) = _split_study(no_training)
    (out / "accuracy.png").mkdir()
    err = usage_error(capsys, "train", "--task", "digits", "--study", "--merge", a, b, "--out", "o")
    assert "argument --out: expected a folder that accuracy.png can be written in" in err


def test_output_files_not_written_are_not_checked(monkeypatch, tmp_path):
    """--no-plot writes no figure: a folder named curves.png is then no obstacle."""
    from jax_batchinhib.apps import train

    seen = []
    monkeypatch.setattr(train, "main", lambda args: seen.append(args.out) or 0)
    (tmp_path / "curves.png").mkdir()
    assert cli.main(["train", "--no-plot", "--out", str(tmp_path)]) == 0
    assert seen == [str(tmp_path)]
    assert study.output_files(("mlp",), ("bn",), plot=False) == [
        "results.partial.json.mlp",
        "results.json",
    ]


def test_batch_of_one_row_is_a_usage_error_with_batch_statistics(capsys, no_training):
    """--batch-size 1 passed the checks, then BatchNorm / BatchCenter raised mid-run (after
    the variants before them had trained; the study left an empty folder). It is refused
    up front when a variant takes statistics over the batch's rows, and allowed when none
    does."""
    from jax_batchinhib.apps import train

    err = usage_error(capsys, "train", "--variants", "none", "two_branch", "--batch-size", "1")
    assert "argument --batch-size: must be >= 2 when a variant normalizes by statistics " in err
    assert "(two_branch), which need more than one row; got 1" in err
    err = usage_error(capsys, "train", "--batch-size", "1")  # the default variants
    assert "(flax_batchnorm, batchnorm, batchnorm+inhib," in err and "(none" not in err
    for task in (["--task", "digits", "--study"], ["--task", "mnist1d", "--model", "mlp"]):
        err = usage_error(capsys, "train", *task, "--quick", "--batch-size", "1")
        assert "argument --batch-size: must be >= 2 with the MLP: the baseline bn" in err
    assert list(no_training.iterdir()) == []
    # no batch statistics: a batch of one row is fine
    assert not train.uses_batch_statistics("none")
    args = cli.build_parser().parse_args(["train", "--batch-size", "1", "--variants", "none"])
    args.epochs, args.seeds, args.lr, args.devices = 1, 1, 1e-3, 1
    train.check_args(args)
    # the CNN's statistics are over the rows and the positions of a signal
    args = cli.build_parser().parse_args(
        ["train", "--task", "mnist1d", "--quick", "--model", "cnn", "--batch-size", "1"]
    )
    assert study.config_from_args(args)["cfg"]["batch_size"] == 1


def test_eval_every_default_is_cut_to_the_steps(capsys, no_training):
    """--steps 100 alone failed with "argument --eval-every: at most the number of steps
    (100); got 250", a value the user never gave: the default is cut to --steps. An
    explicit --eval-every over --steps is still an error."""

    def cfg(*argv):
        return study.config_from_args(cli.build_parser().parse_args(["train", *argv]))["cfg"]

    assert cfg("--task", "mnist1d", "--steps", "100")["eval_every"] == 100
    assert cfg("--task", "mnist1d", "--steps", "300")["eval_every"] == 250
    assert cfg("--task", "mnist1d", "--quick", "--steps", "7")["eval_every"] == 7
    err = usage_error(capsys, "train", "--task", "mnist1d", "--steps", "100", "--eval-every", "250")
    assert "argument --eval-every: at most the number of steps (100); got 250" in err
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "steps between evaluations, at most --steps; default 250 on mnist1d" in text
    assert "or --steps when that is fewer" in text


def _fake_variant(calls):
    """A stand-in for train.train_variant: records the names, returns a result at once."""

    def fake(name, data, *, epochs, seeds, **kw):
        calls.append(name)
        acc = [0.5] * seeds
        return {
            "variant": name,
            "description": name,
            "test_acc_per_seed": acc,
            "test_acc_mean": 0.5,
            "test_acc_std": 0.0,
            "steps_per_s": 10.0,
            "steps_per_s_includes_compile": epochs == 1,
            "curves": {k: [[0.5] * epochs] * seeds for k in ("train_loss", "test_acc")},
        }

    return fake


def test_digits_variant_named_twice_runs_once(capsys, monkeypatch, tmp_path):
    """--variants none none trained "none" twice (two identical rows); as in the study, a
    variant named twice runs once, in the order first given."""
    from jax_batchinhib.apps import train

    calls = []
    monkeypatch.setattr(train, "train_variant", _fake_variant(calls))
    argv = ["train", "--variants", "none", "batchnorm", "none", "--epochs", "2"]
    code, _ = run_cli(capsys, *argv, "--quiet", "--no-plot", "--out", str(tmp_path))
    assert code == 0 and calls == ["none", "batchnorm"]
    d = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in d["results"]] == ["none", "batchnorm"]
    calls.clear()
    kw = dict(epochs=1, seeds=1, batch_size=64, lr=1e-3, quiet=True)
    assert [r["variant"] for r in train.run(["batchnorm", "none", "batchnorm"], **kw)] == [
        "batchnorm",
        "none",
    ]


def test_steps_per_s_of_one_epoch_says_it_includes_compilation(capsys, monkeypatch, tmp_path):
    """With --epochs 1 the only timed epoch is the compiling one, yet the header said
    steps/s was timed "after the first (compiling) epoch"."""
    from jax_batchinhib.apps import train

    monkeypatch.setattr(train, "train_variant", _fake_variant([]))
    for epochs, compiled in (("1", True), ("2", False)):
        argv = ["train", "--variants", "none", "--epochs", epochs, "--quiet", "--no-plot"]
        code, out = run_cli(capsys, *argv, "--out", str(tmp_path))
        assert code == 0
        assert ("after the first (compiling) epoch" in out) is not compiled
        assert ("seeds (vmapped), compilation included (one epoch" in out) is compiled
        assert ("| steps/s (compilation included) |" in out) is compiled
    data = train.load_digits_split()
    monkeypatch.undo()
    for epochs in (1, 2):
        r = train.train_variant("none", data, epochs=epochs, seeds=1, batch_size=512, lr=1e-3)
        assert r["steps_per_s_includes_compile"] is (epochs == 1) and r["steps_per_s"] > 0


def test_seed_shuffles_do_not_depend_on_the_number_of_seeds():
    """Every seed's batches came from one shared generator, so seed 0 of a 2-seed run
    saw other batches from epoch 2 on than a 1-seed run; each seed has its own now."""
    from jax_batchinhib.apps import train

    data = train.load_digits_split()
    kw = dict(epochs=2, batch_size=256, lr=3e-3)
    one = train.train_variant("none", data, seeds=1, **kw)["curves"]
    two = train.train_variant("none", data, seeds=2, **kw)["curves"]
    for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_allclose(two[k][0], one[k][0], rtol=1e-6, atol=1e-7, err_msg=k)
    assert two["train_loss"][0] != two["train_loss"][1]  # the two seeds differ
