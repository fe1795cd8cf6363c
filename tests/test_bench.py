"""Smoke test of the benchmark harness on tiny shapes.

It checks that the harness computes what BENCHMARKS.md reports (ratios, residual and
temp bytes, hardware-limit fractions, targets) and writes valid JSON and markdown. It
never asserts a speed: timings on a shared 2-core machine say nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jax_batchinhib.apps import bench

QUIET = dict(repeats=3, min_time=1e-4, budget=0.05, sync="each", log=lambda s: None)


@pytest.fixture(scope="module")
def results():
    cases = [
        bench._bn_case((16, 8), jnp.float32),
        bench._bi_case((32, 8), groups=2),
        bench._sce_case((8, 5)),
    ]
    return bench.run(cases, **QUIET)


def test_residual_bytes_counts_what_vjp_keeps():
    # sin keeps cos(x) (one x-sized float32 array); x * x keeps x itself (an input);
    # a linear map by a closed-over constant keeps nothing input-sized.
    x = jnp.ones((4, 8), jnp.float32)
    assert bench.residual_bytes(jnp.sin, (x,))["resid_bytes"] == 4 * 8 * 4
    r = bench.residual_bytes(lambda x: x * x, (x,))
    assert r["resid_bytes"] == 4 * 8 * 4 and r["resid_input_bytes"] == 4 * 8 * 4
    assert bench.residual_bytes(lambda x: 2.0 * x, (x,))["resid_bytes"] < x.nbytes


def test_every_case_has_ratios_memory_and_limits(results):
    assert [c["name"] for c in results["cases"]] == [
        "batch_norm/16x8/float32",
        "batch_inhib/32x8/g2/float32",
        "softmax_cross_entropy/8x5/float32",
    ]
    for c in results["cases"]:
        assert "error" not in c, c.get("error")
        cs = c["contenders"]
        for name in ("ours", "autodiff"):
            assert cs[name]["median_s"] > 0 and len(cs[name]["times_s"]) == c["rounds"] >= 3
            assert cs[name]["resid_bytes"] > 0
            assert cs[name]["temp_bytes"] is None or cs[name]["temp_bytes"] >= 0
        r = c["ratios"]["ours/autodiff"]
        assert r["time"] == pytest.approx(cs["ours"]["median_s"] / cs["autodiff"]["median_s"])
        assert r["resid"] == pytest.approx(
            cs["ours"]["resid_bytes"] / cs["autodiff"]["resid_bytes"]
        )
    bn, bi, sce = results["cases"]
    assert set(bn["ratios"]) == {"ours/autodiff", "ours/flax", "ours/flax_2pass", "ours/ours_2pass"}
    assert set(sce["ratios"]) == {"ours/autodiff", "ours/optax"}
    # batch_norm keeps x (16*8 float32) and per-feature vectors only
    assert 16 * 8 * 4 <= bn["contenders"]["ours"]["resid_bytes"] < 16 * 8 * 4 + 8 * 4 * 8
    lim = bn["limit"]
    assert lim["bytes"] == 4 * 16 * 8 * 4
    assert lim["fraction"] == pytest.approx(lim["ours_GBps"] / lim["copy_GBps"])
    # batch_inhib: 10 M N n flops, n = N / groups
    assert bi["limit"]["flops"] == 10 * 32 * 8 * 4 and bi["limit"]["fraction"] > 0


def test_targets_and_machine(results):
    m = results["machine"]
    assert m["cores"] >= 1 and m["device_kind"] == jax.devices()[0].device_kind
    assert m["jax"] == jax.__version__
    by = {(t["family"], t["metric"]): t for t in results["targets"]}
    assert by[("batch_norm", "ours/flax")]["status"] in ("met", "missed")
    assert by[("cnn_train_step", "ours/flax")]["status"] == "not measured"
    t = by[("batch_norm", "ours/autodiff")]
    ratio = results["cases"][0]["ratios"]["ours/autodiff"]["time"]
    assert t["status"] == ("met" if ratio <= 0.7 else "missed")
    # one batch_norm shape was run: the row says so, not "every shape"
    assert t["where"] == "every shape run (1)"


def test_json_and_markdown(results, tmp_path):
    path = tmp_path / "r.json"
    bench.write_json(results, str(path))
    back = json.loads(path.read_text())
    assert back["cases"][0]["name"] == "batch_norm/16x8/float32"
    assert all(math.isfinite(t) for t in back["cases"][0]["contenders"]["ours"]["times_s"])
    md = bench.render_markdown([back, back], notes="## Notes\n\nhello")
    assert md.count("## CPU") == 2 and md.rstrip().endswith("hello")
    for c in back["cases"]:
        assert c["name"] in md
    assert "| batch_norm | ours/flax | <= 0.9 |" in md
    assert "max abs error of y" in md  # the large-mean accuracy table of a batch_norm run
    assert bench.headline_table(back).count("\n") == 1 + len(back["cases"])


def test_merge_runs_takes_the_median_over_whole_runs(results):
    """``--runs K``: each figure is the median over the runs, every run's ratio kept, the
    targets judged on the median; a case that failed once keeps its error."""
    runs = []
    for j, (r, t) in enumerate([(0.5, 2.0), (1.5, 1.0), (0.65, 3.0)]):
        run = json.loads(json.dumps(results, default=bench._json_default))
        run["date"] = f"run {j}"
        bn = run["cases"][0]
        bn["ratios"]["ours/autodiff"]["time"] = r
        bn["contenders"]["ours"]["median_s"] = t
        runs.append(run)
    runs[1]["cases"][2] = {"name": runs[1]["cases"][2]["name"], "family": "x", "error": "E: boom"}
    merged = bench.merge_runs(runs)
    assert merged["runs"] == 3 and merged["run_dates"] == ["run 0", "run 1", "run 2"]
    bn = merged["cases"][0]
    assert bn["ratios"]["ours/autodiff"]["time"] == 0.65
    assert bn["ratios"]["ours/autodiff"]["time_runs"] == [0.5, 1.5, 0.65]
    assert bn["contenders"]["ours"]["median_s"] == 2.0
    # the hardware limit from the merged medians, so the rate agrees with the time shown
    # (it was one run's: 2.2 GB/s of time beside 1.3 GB/s in the committed table)
    lim, copy_s = bn["limit"], bn["contenders"]["copy"]["median_s"]
    assert lim["ours_GBps"] == pytest.approx(lim["bytes"] / 2.0 / 1e9)
    assert lim["copy_GBps"] == pytest.approx(lim["bytes"] / copy_s / 1e9)
    assert lim["fraction"] == pytest.approx(copy_s / 2.0)
    assert (
        len(bn["contenders"]["ours"]["times_s"])
        == bn["rounds"]
        == 3 * results["cases"][0]["rounds"]
    )
    assert merged["cases"][2]["error"] == "E: boom"
    by = {(t["family"], t["metric"]): t for t in merged["targets"]}
    assert by[("batch_norm", "ours/autodiff")]["status"] == "met"  # 0.65 <= 0.7
    md = bench.render_markdown([merged])
    assert "3 whole runs" in md and "**0.65** (0.50-1.50)" in md
    assert bench.merge_runs(runs[:1]) is runs[0]
    with pytest.raises(ValueError, match="same cases"):
        bench.merge_runs([runs[0], {**runs[2], "cases": runs[2]["cases"][:1]}])
    with pytest.raises(SystemExit) as e:
        bench.main(["--runs", "0", "--cases", "batch_norm/256x1024/float32"])
    assert e.value.code == 2


def test_the_run_keeps_flax_fast_variance_in_view(results):
    """A run with a batch_norm case reports the large-mean accuracy: ours (one-pass and
    two-pass) within 1e-3 of float64 (measured 3.3e-7), flax's one-pass variance
    collapsing (its E[x^2] - E[x]^2 cancels to 0 at mean 1e4, std 1e-2 in float32)."""
    acc = results["accuracy"]
    for k in ("ours", "ours_2pass"):
        assert acc[k]["max_abs_err_y"] <= 1e-3
        assert acc[k]["var_ratio_min"] == pytest.approx(1, rel=1e-3)
        assert acc[k]["var_ratio_max"] == pytest.approx(1, rel=1e-3)
    assert not (0.5 < acc["flax"]["var_ratio_min"] <= acc["flax"]["var_ratio_max"] < 2)
    assert acc["flax"]["max_abs_err_y"] > 1


def test_main_list_and_unknown_case(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "batch_norm/4096x512/bfloat16" in out and "cnn_train_step/" in out
    assert "iter_norm/1024x512/float32" in out and "zca_norm/1024x512/g16/float32" in out
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", "nope/*"])
    assert e.value.code == 2
    assert "argument --cases: ['nope/*'] matched no case" in capsys.readouterr().err


def test_looped_runs_every_step_and_keeps_every_output():
    # K = k * unroll chained steps; each slot holds one step's output, equal to the single
    # step's (the 1e-30 offset is below float32 round-off of values near 1: exact here).
    def step(a, b):
        return a * 2 + 1, jnp.sum(b * b)

    a = jnp.linspace(0.5, 1.5, 64 * 32, dtype=jnp.float32).reshape(64, 32)
    b = jnp.ones((64, 32), jnp.float32)
    want = jax.jit(step)(a, b)
    for unroll in (1, 4):
        f = jax.jit(bench.looped(step, 3, unroll))
        outs = f(a, b)
        assert len(outs) == unroll
        for o in outs:
            assert all(bool(jnp.array_equal(x, y)) for x, y in zip(o, want, strict=True))
    # XLA kept the 4 unrolled steps apart (no hoisting or merging): 4x the step's kernels.
    n1 = jax.jit(bench.looped(step, 3, 1)).lower(a, b).compile().as_text().count(" fusion(")
    n4 = jax.jit(bench.looped(step, 3, 4)).lower(a, b).compile().as_text().count(" fusion(")
    assert n4 >= n1 + 3


def test_time_case_loop_method():
    res = bench.time_case(
        bench._bn_case((16, 8), jnp.float32),
        repeats=3,
        min_time=1e-3,
        budget=0.05,
        sync="batch",
        method="loop",
        unroll=2,
        log=lambda s: None,
    )
    for info in res["contenders"].values():
        k, u = info["steps_per_call"], info["steps_per_iteration"]
        assert 1 <= u <= 2 and k % u == 0 and info["calls_per_timing"] >= 1
        assert info["median_s"] > 0 and info["single_call_s"] > 0
    assert res["ratios"]["ours/autodiff"]["time"] > 0 and res["limit"]["fraction"] > 0


def test_no_large_is_honoured_with_cases(capsys):
    big = "batch_norm/65536x1024/float32"
    assert big in [c.name for c in bench.select_cases(["batch_norm/*"], quick=True)]
    names = [c.name for c in bench.select_cases(["batch_norm/*"], quick=True, large=False)]
    assert big not in names and "batch_norm/256x1024/float32" in names
    with pytest.raises(SystemExit) as e:
        bench.main(["--cases", big, "--no-large"])
    assert e.value.code == 2
    assert f"argument --cases: ['{big}'] matched no case" in capsys.readouterr().err


def test_quick_and_full_choose_the_timing_defaults():
    p = bench.build_parser()
    quick = bench.timing_settings(p.parse_args(["--quick", "--cases", "x"]))
    assert quick == {"mode": "quick", "repeats": 7, "min_time": 0.005, "budget": 4.0}
    assert bench.timing_settings(p.parse_args([])) == quick  # the default mode
    full = bench.timing_settings(p.parse_args(["--full", "--repeats", "3"]))
    assert full == {"mode": "full", "repeats": 3, "min_time": 0.02, "budget": 12.0}
    with pytest.raises(SystemExit):  # mutually exclusive
        p.parse_args(["--quick", "--full"])
    # --quick selects the quick subset when no --cases is given
    sel = [c.name for c in bench.select_cases(None, quick=True, large=False)]
    assert sel == list(bench.QUICK)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--cases", "batch_norm/256x1024/float32", "batch_nrom/*"],
            "argument --cases: 'batch_nrom/*' matched no case",
        ),
        (["--memory", "--scaling"], "argument --scaling: not allowed with --memory"),
        (["--memory", "--full"], "argument --full: does not apply to --memory"),
        (["--scaling", "--runs", "3"], "argument --runs: does not apply to --scaling"),
        (["--memory", "--cases", "x"], "argument --cases: does not apply to --memory"),
        (["--list", "--json", "x.json"], "argument --json: does not apply to --list"),
        (["--json", ""], "argument --json: expected a file path; got ''"),
        (["--json", "a.out", "--markdown", "a.out"], "argument --markdown: the same file as"),
        (["--repeats", "2"], "argument --repeats: at least 3 rounds per case"),
    ],
)
def test_bench_argument_errors(capsys, tmp_path, monkeypatch, argv, message):
    """A misspelled pattern beside a good one was dropped, modes and options that do not
    go together were ignored, an empty path wrote nothing and exited 0, --json and
    --markdown could be one file, --repeats 1 ran 3 rounds: each is a usage error,
    before anything is timed or written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed despite the error"))
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", [["--json=OUT"], ["--js", "OUT"], ["--markdown", "OUT"]])
def test_run_py_leaves_the_committed_results_alone_with_an_output(monkeypatch, tmp_path, spelling):
    """benchmarks/run.py looked for the literal "--json": "--json=PATH" or the
    abbreviation "--js PATH" made it add "--json benchmarks/results_cpu.json", which
    argparse took as the last word, overwriting the committed results; and it
    re-rendered BENCHMARKS.md whatever the output."""
    import runpy

    run_py = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"))
    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)
    monkeypatch.setitem(run_py["main"].__globals__, "render", lambda: pytest.fail("rendered"))
    out = str(tmp_path / "r.json")
    argv = ["--cases", "batch_norm/256x1024/float32"] + [a.replace("OUT", out) for a in spelling]
    assert run_py["main"](argv) == 0
    assert seen == [argv]  # nothing added: the user's output only
    rendered = []
    monkeypatch.setitem(run_py["main"].__globals__, "render", lambda: rendered.append(1))
    run_py["main"](["--cases", "batch_norm/256x1024/float32"])
    assert seen[-1][-1].endswith(".json") and "benchmarks" in seen[-1][-1] and rendered == [1]


def test_scaling_slopes_and_missing_layers(tmp_path):
    sc = bench.scaling(
        layers=("batch_norm", "batch_inhib_g2", "no_such_norm"),
        ms=(64, 128, 256),
        ns=(4, 8),
        fixed={"m": 64, "n": 4},
        repeats=1,
        log=lambda s: None,
    )
    assert sc["skipped"] == ["no_such_norm"]
    bn = sc["layers"]["batch_norm"]
    assert bn["m"]["values"] == [64, 128, 256] and bn["n"]["values"] == [4, 8]
    # batch_norm keeps x (m x N float32) and a few per-feature vectors: slope just below 1
    # in m (the vectors do not grow with m), 1 in N
    assert 0.9 < bn["m"]["kept_slope"] < 1.0
    assert bn["n"]["kept_slope"] == pytest.approx(1.0, abs=0.02)
    assert all(t > 0 for t in bn["m"]["time_s"])
    png = bench.plot_scaling(sc, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000 and png.endswith("s.png")
    md = "\n".join(bench.render_scaling(sc, "s.png"))
    assert "![scaling curves](s.png)" in md and "no_such_norm" in md


def test_train_step_memory_on_a_tiny_mlp(monkeypatch):
    tiny = (
        "MLP",
        (8, 6),
        {"features": (4,)},
        {"ours": ("batchnorm", False), "flax": ("flax_batchnorm", False)},
    )
    monkeypatch.setitem(bench.MEMORY_MODELS, "tiny", tiny)
    mem = bench.train_step_memory(["tiny"])["tiny"]
    ours, flax = mem["contenders"]["ours"], mem["contenders"]["flax"]
    assert ours["argument_bytes"] > 8 * 6 * 4 and flax["temp_bytes"] >= 0
    assert mem["ratios"]["ours/flax"]["temp"] == pytest.approx(
        ours["temp_bytes"] / max(flax["temp_bytes"], 1)
    )
    assert "| MLP 8x6 | ours |" in "\n".join(bench.render_memory({"tiny": mem}))


def test_benchmarks_md_is_rendered_from_the_committed_results_and_notes():
    """BENCHMARKS.md is generated (`python benchmarks/run.py` writes it): its text is what
    the committed benchmarks/*.json and benchmarks/notes.md render to, so an edit of the
    notes or a new run that was not re-rendered fails here."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_run", root / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert (root / "BENCHMARKS.md").read_text() == run.markdown(), (
        "BENCHMARKS.md is stale: re-render it with `python benchmarks/run.py --render`"
    )
