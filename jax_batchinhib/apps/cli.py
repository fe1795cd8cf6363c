"""The command line: ``jax-batchinhib {verify,train,bench}`` (also ``python -m jax_batchinhib``).

- ``verify``: every hand-derived VJP against autodiff of its reference, over shapes and
  float32 / float64 / bfloat16; exits 1 if any check is over its tolerance.
- ``train``: the example models on scikit-learn's digits, several variants and seeds;
  ``--task mnist1d``: the BatchInhib study on MNIST-1D (:mod:`jax_batchinhib.apps.study`).
- ``bench``: the speed and memory harness (``benchmarks``), ``--quick`` by default.

Heavy imports (training, benchmarks) happen inside the subcommand that needs them.

A bad option value is a usage error, reported the argparse way (the usage, then
``jax-batchinhib train: error: argument --batch-size: ...``; exit status 2), before
anything is trained or written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

#: ``train`` options of the study only (their ``dest``), and of ``--task digits`` without
#: ``--study`` only; the study's options are None (or False) when not given
STUDY_ONLY = ("model", "lrs", "steps", "eval_every", "val_seeds", "quick", "jobs", "merge")
DIGITS_ONLY = ("epochs", "lr", "devices")
#: the settings of a training run, which ``--merge`` (it trains nothing) does not take
TRAINING = (*(d for d in STUDY_ONLY if d != "merge"), "seeds", "variants", "batch_size")
STUDY_MODE = "the study (--task mnist1d, or --task digits --study)"
DIGITS_MODE = "--task digits without --study"


def _folder_problem(path: str) -> str | None:
    """Why the folder ``path`` cannot be written to, or None. Nothing is created: a
    temporary file is made and removed in ``path``, or, when ``path`` does not exist yet,
    in its nearest existing ancestor (whoever writes the output creates the folders then,
    so a later failing check leaves no empty folders behind)."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    existing = existing or "."
    if not os.path.isdir(existing):
        return f"{existing!r} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        verb = "write in" if existing == path else f"create {path!r} in"
        return f"cannot {verb} {existing!r}: {e.strerror or e}"
    return None


def output_dir_problem(path: str, files: Sequence[str] = ()) -> str | None:
    """Why ``path`` cannot be an output folder, or None when it can (its writer creates
    it if it is missing). ``files``: the names its writer writes in it, each checked as
    :func:`output_file_problem` does (e.g. a folder where ``results.json`` goes)."""
    if not path.strip():  # os.makedirs("") fails, after the run
        return f"expected a folder path; got {path!r}"
    why = _folder_problem(path)
    if why:
        return f"expected a folder that can be created and written to; got {path!r} ({why})"
    for name in files:
        why = _file_problem(os.path.join(path, name))
        if why:
            return f"expected a folder that {name} can be written in; got {path!r} ({why})"
    return None


def _file_problem(path: str) -> str | None:
    """Why the file ``path`` cannot be written, or None (see :func:`output_file_problem`)."""
    if os.path.isdir(path):
        return f"{path!r} is a folder"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path!r} is not writable"
    return _folder_problem(os.path.dirname(path) or ".")


def output_file_problem(path: str) -> str | None:
    """Why the file ``path`` cannot be written, or None when it can (its writer creates
    its folder if it is missing)."""
    why = _file_problem(path)
    if why:
        return (
            f"expected a file in a folder that can be created and written to; got {path!r} ({why})"
        )
    return None


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args, dest: str) -> bool:
    return getattr(args, dest, None) not in (None, False)


def _verify_parser(sub):
    p = sub.add_parser(
        "verify",
        help="check every hand-derived VJP against autodiff",
        description="Check every op's hand-derived VJP against jax.vjp of its naive "
        "reference (forward output and every input's gradient), over several shapes and "
        "dtypes. Exits with status 1 if any error is over its tolerance.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float64", "bfloat16"],
        choices=["float32", "float64", "bfloat16"],
        help="dtypes to check (default: all three)",
    )
    p.add_argument(
        "--ops", nargs="+", default=None, help="only ops whose name contains one of these"
    )
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument(
        "--summary", action="store_true", help="print only the per-op summary (markdown)"
    )
    p.set_defaults(func=_run_verify, _parser=p)


def _run_verify(args, rest):
    from jax_batchinhib.apps import verify

    bad, names = verify.unmatched(args.ops, args.quick)
    if bad:  # a typo would otherwise check nothing and pass
        args._parser.error(
            f"argument --ops: {bad[0]!r} is in no op's name (the names: {', '.join(names)})"
        )
    return verify.main(args)


def _study_default(key: str, fmt=str) -> str:
    """The study's default of ``key`` per task (one value when the tasks agree), and
    with ``--quick`` when that differs: from ``study.DEFAULTS`` and ``study.QUICK``."""
    from jax_batchinhib.apps.study import DEFAULTS, QUICK

    per_task = {task: fmt(d[key]) for task, d in DEFAULTS.items()}
    if len(set(per_task.values())) == 1:
        text = next(iter(per_task.values()))
    else:
        text = ", ".join(f"{v} on {task}" for task, v in per_task.items())
    if key in QUICK and {fmt(QUICK[key])} != set(per_task.values()):
        text += f" ({fmt(QUICK[key])} with --quick)"
    return text


def _train_parser(sub):
    from jax_batchinhib.apps.study import (
        BASELINE,
        HEATMAP_VARIANT,
        MNIST1D_SAMPLES,
        QUICK_VARIANTS,
    )
    from jax_batchinhib.apps.train import DEFAULT_VARIANTS, DEFAULTS, VARIANTS

    p = sub.add_parser(
        "train",
        help="train the example models (digits), or run the BatchInhib study (mnist1d)",
        description="--task digits (default): train every variant on scikit-learn's 8x8 "
        "digits (shipped with scikit-learn, nothing is downloaded) for several seeds; print "
        "test accuracy (mean ± std over seeds) and steps/s; write curves.png and "
        "results.json. --task mnist1d (or --task digits --study): the study -- each "
        "variant's learning rate chosen on a validation split, then several seeds scored "
        "on the test set and compared with our BatchNorm (paired 95% CI); writes "
        f"results.json, accuracy.png, curves.png and, when {HEATMAP_VARIANT} runs, "
        "inhib_<model>.png. MNIST-1D is generated offline by the mnist1d package.",
    )
    p.add_argument(
        "--task",
        choices=["digits", "mnist1d"],
        default="digits",
        help="data set (default %(default)s; mnist1d always runs the study)",
    )
    p.add_argument(
        "--study", action="store_true", help="with --task digits: run the study protocol"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"digits without --study: epochs (default {DEFAULTS['epochs']})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per variant (default {DEFAULTS['seeds']}; study: at least 2, default "
        f"{_study_default('seeds')})",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="variants to train (digits default: "
        + ", ".join(DEFAULT_VARIANTS)
        + "; also: "
        + ", ".join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)
        + "). Study: every variant of jax_batchinhib.apps.study.VARIANTS by default ("
        + " ".join(QUICK_VARIANTS)
        + f" with --quick); {BASELINE}, the baseline, always runs",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {DEFAULTS['batch_size']} (study: {_study_default('batch_size')})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"digits without --study: Adam learning rate (default {DEFAULTS['lr']})",
    )
    p.add_argument("--out", default=None, help="output folder (default out/train, out/study-TASK)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="digits without --study: data-parallel over this many devices: the GPUs, or "
        "on CPU this many host devices (XLA's host platform device count); the batch size "
        "must divide evenly (default 1)",
    )
    s = p.add_argument_group("study (--task mnist1d, or --task digits --study)")
    s.add_argument(
        "--model",
        nargs="+",
        choices=["mlp", "cnn"],
        default=None,
        help=f"default {_study_default('models', ' '.join)}",
    )
    s.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=None,
        help="the learning-rate grid, at least 2 positive values; default "
        + _study_default("lrs", lambda v: " ".join(f"{x:g}" for x in v)),
    )
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run; default {_study_default('steps')}",
    )
    s.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"steps between evaluations, at most --steps; default "
        f"{_study_default('eval_every')}, or --steps when that is fewer",
    )
    s.add_argument(
        "--val-seeds",
        type=int,
        default=None,
        help=f"seeds per grid value; default {_study_default('val_seeds')}",
    )
    s.add_argument(
        "--quick",
        action="store_true",
        help="a tiny study (for tests): the --quick defaults above, and MNIST-1D of "
        f"{MNIST1D_SAMPLES[True]} examples instead of {MNIST1D_SAMPLES[False]}",
    )
    s.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="models trained at once, one process each (default: one per model, up to the "
        "CPU count)",
    )
    s.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="train nothing: merge these results.json files of one task and configuration "
        "(variants split over several runs) into --out: results.json, accuracy.png and "
        "curves.png (--no-plot: results.json only), and print its tables",
    )
    p.set_defaults(func=_run_train, _parser=p)


def _check_modes(args, study_mode: bool) -> str | None:
    """An option given to the mode it does not apply to, as an argparse error message."""
    if args.merge:
        for dest in TRAINING:
            if _given(args, dest):
                return (
                    f"argument {_flag(dest)}: not allowed with --merge, which trains nothing "
                    "(the merged files' settings are kept)"
                )
    wrong, mode = (DIGITS_ONLY, DIGITS_MODE) if study_mode else (STUDY_ONLY, STUDY_MODE)
    other = STUDY_MODE if study_mode else DIGITS_MODE
    for dest in wrong:
        if _given(args, dest):
            return f"argument {_flag(dest)}: applies to {mode} only; got it with {other}"
    return None


def _run_train(args, rest):
    error = args._parser.error
    study_mode = args.task == "mnist1d" or args.study
    problem = _check_modes(args, study_mode)
    if problem:
        error(problem)
    if study_mode:
        from jax_batchinhib.apps import study

        if args.out is None:
            args.out = f"out/study-{args.task}"
        if args.merge:
            try:
                merged = study.merge_files(args.merge, task=args.task)
            except ValueError as e:
                error(str(e))
            # a merge writes no partial results and no heatmaps: no models, no variants
            _check_out(args.out, error, study.output_files((), (), plot=not args.no_plot))
            return study.write_merged(merged, args.out, plot=not args.no_plot)
        try:
            c = study.config_from_args(args)
        except ValueError as e:
            error(str(e))
        files = study.output_files(c["models"], c["variants"], plot=not args.no_plot)
        _check_out(args.out, error, files)
        return study.main(args)
    from jax_batchinhib.apps.train import DEFAULTS, VARIANTS

    if args.variants is None:
        from jax_batchinhib.apps.train import DEFAULT_VARIANTS

        args.variants = list(DEFAULT_VARIANTS)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        error(
            f"argument --variants: invalid choice: {bad[0]!r} (choose from {', '.join(VARIANTS)})"
        )
    args.variants = list(dict.fromkeys(args.variants))  # a variant named twice runs once
    for dest in ("epochs", "seeds", "batch_size", "lr", "out"):
        if getattr(args, dest) is None:
            setattr(args, dest, DEFAULTS[dest])
    if args.devices is None:
        args.devices = 1
    from jax_batchinhib.apps import train

    try:
        train.check_args(args)
    except ValueError as e:
        error(str(e))
    if args.devices > 1:  # before JAX creates its CPU backend (importing jax does not)
        import jax

        from jax_batchinhib import parallel

        try:
            parallel.set_cpu_device_count(args.devices)
        except RuntimeError as e:  # XLA_FLAGS or jax's config already fixed fewer
            error(f"argument --devices: {e}")
        have = len(jax.devices())
        if have < args.devices:
            error(
                f"argument --devices: must be at most the {have} {jax.default_backend()} "
                f"device(s) JAX sees; got {args.devices}"
            )
    _check_out(args.out, error, train.output_files(plot=not args.no_plot))
    return train.main(args)


def _check_out(path: str, error, files: Sequence[str] = ()) -> None:
    """``--out`` and the ``files`` the run writes in it, as a usage error, before the run."""
    problem = output_dir_problem(path, files)
    if problem:
        error(f"argument --out: {problem}")


def _bench_parser(sub):
    p = sub.add_parser(
        "bench",
        help="speed and memory benchmarks (--quick by default)",
        description="Forwarded to jax_batchinhib.apps.bench.main: --quick (default), --full, "
        "--json, --markdown.",
        add_help=False,
    )
    p.set_defaults(func=_run_bench)


def _run_bench(args, rest):
    from jax_batchinhib.apps import bench

    code = bench.main(rest)
    return 0 if code is None else int(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-batchinhib",
        description="JAX/Flax layers with hand-derived backward passes: prove them, train "
        "with them, time them.",
    )
    from jax_batchinhib import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{verify,train,bench}")
    sub.required = True
    _verify_parser(sub)
    _train_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jax-batchinhib`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        # bench's own parser owns its flags (--quick/--full/--json/--markdown, -h).
        args, rest = parser.parse_args(["bench"]), argv[1:]
    else:
        args, rest = parser.parse_args(argv), []
    return int(args.func(args, rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
