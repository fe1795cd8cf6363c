"""Regenerate the README's measured blocks from the commands that measure them.

Each block sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in README.md:

- ``verify-table``: ``jax-batchinhib verify --summary`` (every hand-derived VJP against
  autodiff; fixed seeds, so the same CPU and jax version print the same numbers);
- ``train-table``: ``jax-batchinhib train`` with its defaults (fixed seeds; the accuracy
  column repeats on the same CPU and jax version; steps/s is left out, it is a timing);
- ``diverge-line``: ``jax-batchinhib train --variants batchnorm+inhib_a0``, the one
  configuration the README says diverges, with the same defaults;
- ``study-table``: the MNIST-1D headline rows of the committed
  ``docs/results/mnist1d_results.json`` (``jax-batchinhib train --task mnist1d``);
- ``speed-table``: the ratio ranges of the committed ``benchmarks/results_*.json``
  (``python benchmarks/run.py --full`` writes them; this script only reads them).

Usage::

    python tools/readme.py --write            # run the commands, rewrite the blocks
    python tools/readme.py --check            # run them, exit 1 if README.md differs
    python tools/readme.py --write --only verify-table
    python tools/readme.py --write --only train-table --train-json out/train/results.json

``tests/test_readme.py`` checks the parts that do not need the long runs (the op and
variant lists, the check counts, the tolerances, the run's configuration) on every test
run; ``--check`` compares everything.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def block_pattern(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- BEGIN {re.escape(name)} -->\n)(.*?)(<!-- END {re.escape(name)} -->)", re.S
    )


def read_block(text: str, name: str) -> str:
    m = block_pattern(name).search(text)
    if m is None:
        raise KeyError(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
    return m.group(2)


def replace_block(text: str, name: str, body: str) -> str:
    read_block(text, name)  # raises if missing
    return block_pattern(name).sub(lambda m: m.group(1) + body + m.group(3), text)


# ------------------------------------------------------------------------------ verify


def verify_block(results=None) -> str:
    """The ``verify --summary`` table, from ``results`` (default: run every check)."""
    from jax_batchinhib.apps import verify

    if results is None:
        results = verify.run()
    return verify.summary(results) + "\n"


# ------------------------------------------------------------------------------- train


def train_config_line(epochs, seeds, batch_size, lr, n_train, n_test) -> str:
    return (
        f"Scikit-learn's digits ({n_train} train / {n_test} test, 8x8 pixels), MLP 64-64, "
        f"{epochs} epochs, batch {batch_size}, Adam {lr:g}, {seeds} seeds each (vmapped), CPU:"
    )


def variant_description(name: str) -> str:
    from jax_batchinhib.apps.train import VARIANTS

    return VARIANTS[name][0]


def train_table(results: list[dict], seeds: int) -> str:
    lines = [
        f"| variant | model | test accuracy (mean ± std, {seeds} seeds) |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['variant']}` | {variant_description(r['variant'])} | "
            f"{100 * r['test_acc_mean']:.2f}% ± {100 * r['test_acc_std']:.2f} |"
        )
    return "\n".join(lines)


def load_train_json(path) -> list[dict]:
    """The results of a ``jax-batchinhib train`` run with the default flags, from its
    ``results.json``; refuses a run with other flags."""
    from jax_batchinhib.apps import train

    data = json.loads(Path(path).read_text())
    cfg, d = data["config"], train.DEFAULTS
    got = {k: cfg[k] for k in ("epochs", "seeds", "batch_size", "lr")}
    want = {k: d[k] for k in got}
    variants = tuple(r["variant"] for r in data["results"])
    if got != want or variants != train.DEFAULT_VARIANTS or cfg.get("devices", 1) != 1:
        raise SystemExit(f"{path}: not a default `jax-batchinhib train` run ({got}, {variants})")
    return data["results"]


def train_block(results=None) -> str:
    """Configuration, table and verdicts of ``jax-batchinhib train`` with its defaults."""
    from jax_batchinhib.apps import train
    from jax_batchinhib.apps.data import load_digits_split

    d = train.DEFAULTS
    if results is None:
        results = train.run(
            train.DEFAULT_VARIANTS,
            epochs=d["epochs"],
            seeds=d["seeds"],
            batch_size=d["batch_size"],
            lr=d["lr"],
            quiet=True,
        )
    xtr, _, xte, _ = load_digits_split()
    cfg = train_config_line(d["epochs"], d["seeds"], d["batch_size"], d["lr"], len(xtr), len(xte))
    comp = train.comparisons(results, len(xte))
    return (
        cfg
        + "\n\n"
        + train_table(results, d["seeds"])
        + "\n\nDifferences of mean test accuracy printed by the run (± standard error over "
        + "seeds; 'ties' when within two standard errors or two test digits):\n\n"
        + "".join(f"- {c}\n" for c in comp)
    )


DIVERGING = "batchnorm+inhib_a0"


def diverge_block(results=None) -> str:
    """The one variant the README says diverges, run with the train defaults."""
    from jax_batchinhib.apps import train

    d = train.DEFAULTS
    if results is None:
        results = train.run(
            [DIVERGING],
            epochs=d["epochs"],
            seeds=d["seeds"],
            batch_size=d["batch_size"],
            lr=d["lr"],
            quiet=True,
        )
    (r,) = results
    return (
        "Not in the default run: the signed denominator at full strength with the default\n"
        f"absolute guard (`jax-batchinhib train --variants {DIVERGING}`) diverges: "
        f"{100 * r['test_acc_mean']:.1f}% ±\n"
        f"{100 * r['test_acc_std']:.1f} test accuracy over {d['seeds']} seeds, where "
        "guessing gives 10%.\n"
    )


# ------------------------------------------------------------------------------- speed

BENCH = README.parent / "benchmarks"


def _machine(res: dict) -> str:
    m = res["machine"]
    who = m["cpu"] + f", {m['cores']} cores" if m["platform"] == "cpu" else m["device_kind"]
    runs = f", median of {res['runs']} runs" if res.get("runs") else ""
    return f"{who}; {res['date'][:10]}{runs}" + (
        " (an earlier run of earlier code)" if res.get("label") else ""
    )


def _span(vals: list[float]) -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}"


def _ratios(res: dict, family: str, key: str, what: str = "time", where=None) -> list[float]:
    out = []
    for c in res["cases"]:
        if c.get("family") != family or "error" in c or (where and not where(c)):
            continue
        r = c["ratios"].get(key, {}).get(what)
        if r is not None:
            out.append(r)
    return out


def speed_rows(res: dict) -> dict[str, str]:
    """One machine's column of the README's speed table, from a bench results JSON."""
    g1 = lambda c: "/g" not in c["name"]  # noqa: E731
    big = lambda c: c["name"].startswith("batch_inhib/1024x512/")  # noqa: E731
    frac = [
        c["limit"]["fraction"]
        for c in res["cases"]
        if c.get("family") == "batch_norm" and c.get("limit", {}).get("fraction")
    ]
    mm = [c["limit"]["fraction"] for c in res["cases"] if big(c) and c.get("limit")]
    white = {}
    for fam in ("iter_norm", "zca_norm"):
        t = _ratios(res, fam, "ours/autodiff")
        k = _ratios(res, fam, "ours/autodiff", "resid")
        white[fam] = "-" if not t else f"{_span(t)} (kept {_span(k)})"
    return {
        "batch_norm fwd+bwd vs autodiff": _span(_ratios(res, "batch_norm", "ours/autodiff")),
        "batch_norm vs flax (its default one-pass variance)": _span(
            _ratios(res, "batch_norm", "ours/flax")
        ),
        "batch_norm vs flax two-pass": _span(_ratios(res, "batch_norm", "ours/flax_2pass")),
        "batch_norm one-pass vs our two-pass": _span(_ratios(res, "batch_norm", "ours/ours_2pass")),
        "batch_norm kept bytes vs autodiff": _span(
            _ratios(res, "batch_norm", "ours/autodiff", "resid")
        ),
        "batch_norm, share of a measured copy's bandwidth": "-"
        if not frac
        else f"{min(frac):.0%}-{max(frac):.0%}",
        "batch_inhib fwd+bwd vs autodiff (groups 1)": _span(
            _ratios(res, "batch_inhib", "ours/autodiff", where=g1)
        ),
        "batch_inhib with 16 groups vs autodiff": _span(
            _ratios(res, "batch_inhib", "ours/autodiff", where=lambda c: "/g16/" in c["name"])
        ),
        "batch_inhib at (1024, 512), share of a matmul's rate": "-" if not mm else f"{mm[0]:.0%}",
        "iter_norm vs autodiff (time; kept bytes)": white["iter_norm"],
        "zca_norm vs autodiff (time; kept bytes)": white["zca_norm"],
        "dropout vs autodiff (time; kept bytes)": _span(_ratios(res, "dropout", "ours/autodiff"))
        + f" ({_span(_ratios(res, 'dropout', 'ours/autodiff', 'resid'))})",
        "softmax_cross_entropy vs autodiff; vs optax": _span(
            _ratios(res, "softmax_cross_entropy", "ours/autodiff")
        )
        + "; "
        + _span(_ratios(res, "softmax_cross_entropy", "ours/optax")),
        "CNN train step vs flax": _span(_ratios(res, "cnn_train_step", "ours/flax")),
    }


def speed_block(paths=None) -> str:
    """The README's speed table: ratio ranges (ours / theirs, medians of interleaved
    rounds) from the committed ``benchmarks/results_*.json``, CPU first."""
    paths = sorted(BENCH.glob("results_*.json")) if paths is None else paths
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs.sort(key=lambda r: r["machine"]["platform"] != "cpu")
    cols = [speed_rows(r) for r in runs]
    lines = ["| ours / theirs | " + " | ".join(_machine(r) for r in runs) + " |"]
    lines.append("| --- |" + " --- |" * len(runs))
    for row in cols[0]:
        lines.append(f"| {row} | " + " | ".join(c.get(row, "-") for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- study

STUDY_ROWS = ("none", "bn", "flax_bn", "bn+bi_signed_abs_near", "bn+bi_abs_abs_a0",
              "bn+bi_abs_abs_a0_rho4", "bi+bn_abs_abs_a0", "iternorm", "zca")  # fmt: skip


def study_block(path=None) -> str:
    """The MNIST-1D headline table, from the committed ``docs/results/mnist1d_results.json``
    (``jax-batchinhib train --task mnist1d``): test accuracy and the paired difference from
    our BatchNorm, per model, for the variants a reader asks about first, with the
    Holm-adjusted p-value over all of the model's comparisons."""
    from jax_batchinhib.apps import study

    path = README.parent / "docs" / "results" / "mnist1d_results.json" if path is None else path
    d = json.loads(Path(path).read_text())
    models = list(d["models"])
    by = {mk: {r["variant"]: r for r in d["models"][mk]["variants"]} for mk in models}
    corrected = {mk: study.holm(d["models"][mk]["variants"]) for mk in models}
    head = " | ".join(
        f"{mk.upper()} test acc | vs `bn`, points (95% CI); Holm-adjusted p" for mk in models
    )
    lines = [f"| variant | {head} |", "|---|" + "---|---|" * len(models)]
    for v in STUDY_ROWS:
        cells = []
        for mk in models:
            r = by[mk][v]
            c = r.get("vs_bn")
            diff = (
                "baseline"
                if c is None
                else f"{study.diff_cell(c)} {c['verdict']}; "
                f"{corrected[mk][v]['p_holm']:.3g} {corrected[mk][v]['verdict']}"
            )
            cells += [f"{100 * r['test_acc_mean']:.1f}% ± {100 * r['test_acc_std']:.1f}", diff]
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    cfg = d["config"]
    return (
        f"MNIST-1D, {cfg['steps']} Adam steps, batch {cfg['batch_size']}, learning rate chosen "
        f"per variant on a validation split from {cfg['lrs']}, {cfg['seeds']} paired seeds:\n\n"
        + "\n".join(lines)
        + "\n"
    )


BLOCKS = {
    "verify-table": verify_block,
    "train-table": train_block,
    "diverge-line": diverge_block,
    "speed-table": speed_block,
    "study-table": study_block,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="rewrite README.md's blocks")
    g.add_argument("--check", action="store_true", help="exit 1 if a block is out of date")
    p.add_argument("--only", nargs="+", choices=sorted(BLOCKS), default=sorted(BLOCKS))
    p.add_argument(
        "--train-json",
        help="take the train block from this results.json of a default `jax-batchinhib train` "
        "run instead of training again",
    )
    args = p.parse_args(argv)
    text = README.read_text()
    new = text
    for name in args.only:
        if name == "train-table" and args.train_json:
            body = train_block(load_train_json(args.train_json))
        else:
            body = BLOCKS[name]()
        new = replace_block(new, name, body)
    if args.write:
        if new != text:
            README.write_text(new)
        print(f"README.md: {', '.join(args.only)} {'rewritten' if new != text else 'unchanged'}")
        return 0
    if new == text:
        print("README.md is up to date")
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            text.splitlines(True), new.splitlines(True), "README.md", "regenerated"
        )
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
