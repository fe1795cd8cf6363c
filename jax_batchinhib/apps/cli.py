"""The command line: ``jax-batchinhib {verify,train,bench}`` (also ``python -m jax_batchinhib``).

- ``verify``: every hand-derived VJP against autodiff of its reference, over shapes and
  float32 / float64 / bfloat16; exits 1 if any check is over its tolerance.
- ``train``: the example models on scikit-learn's digits, several variants and seeds;
  ``--task mnist1d``: the BatchInhib study on MNIST-1D (:mod:`jax_batchinhib.apps.study`).
- ``bench``: the speed and memory harness (``benchmarks``), ``--quick`` by default.

Heavy imports (training, benchmarks) happen inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import sys


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
    p.set_defaults(func=_run_verify)


def _run_verify(args, rest):
    from jax_batchinhib.apps import verify

    bad, names = verify.unmatched(args.ops, args.quick)
    if bad:  # a typo would otherwise check nothing and pass
        sys.stderr.write(
            f"jax-batchinhib verify: error: argument --ops: {bad[0]!r} is in no op's name "
            f"(the names: {', '.join(names)})\n"
        )
        raise SystemExit(2)
    return verify.main(args)


def _train_parser(sub):
    from jax_batchinhib.apps.train import DEFAULT_VARIANTS, DEFAULTS, VARIANTS

    p = sub.add_parser(
        "train",
        help="train the example models (digits), or run the BatchInhib study (mnist1d)",
        description="--task digits (default): train every variant on scikit-learn's 8x8 "
        "digits (shipped with scikit-learn, nothing is downloaded) for several seeds; print "
        "test accuracy (mean ± std over seeds) and steps/s; write curves.png and "
        "results.json. --task mnist1d (or --task digits --study): the study -- each "
        "variant's learning rate chosen on a validation split, then several seeds scored "
        "on the test set and compared with our BatchNorm (paired 95%% CI); writes "
        "results.json, accuracy.png, curves.png and inhib_<model>.png. MNIST-1D is "
        "generated offline by the mnist1d package.",
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
        default=DEFAULTS["epochs"],
        help="digits: epochs (default %(default)s)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeds per variant (default {DEFAULTS['seeds']}; study: 8)",
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
        + "). Study: every variant of jax_batchinhib.apps.study.VARIANTS by default",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {DEFAULTS['batch_size']} (study: 100 on mnist1d, 64 on digits)",
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default %(default)s)"
    )
    p.add_argument("--out", default=None, help="output folder (default out/train, out/study-TASK)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="digits: data-parallel over this many devices: the GPUs, or on CPU this many "
        "host devices (XLA's host platform device count); the batch size must divide "
        "evenly (default %(default)s)",
    )
    s = p.add_argument_group("study (--task mnist1d, or --task digits --study)")
    s.add_argument(
        "--model", nargs="+", choices=["mlp", "cnn"], default=None, help="default: mlp cnn"
    )
    s.add_argument("--lrs", nargs="+", type=float, default=None, help="the learning-rate grid")
    s.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    s.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    s.add_argument("--val-seeds", type=int, default=None, help="seeds per grid value")
    s.add_argument("--quick", action="store_true", help="a tiny study (for tests)")
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
        help="train nothing: merge these results.json files of one task (variants split "
        "over several runs) into --out, with its tables and plots",
    )
    p.set_defaults(func=_run_train)


def _run_train(args, rest):
    if args.task == "mnist1d" or args.study:
        from jax_batchinhib.apps import study

        if args.out is None:
            args.out = f"out/study-{args.task}"
        if args.merge:
            return study.merge_main(args.merge, args.out)
        return study.main(args)
    from jax_batchinhib.apps.train import DEFAULTS, VARIANTS

    if args.variants is None:
        from jax_batchinhib.apps.train import DEFAULT_VARIANTS

        args.variants = list(DEFAULT_VARIANTS)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        sys.stderr.write(
            f"jax-batchinhib train: error: argument --variants: invalid choice: {bad[0]!r} "
            f"(choose from {', '.join(VARIANTS)})\n"
        )
        raise SystemExit(2)
    args.seeds = DEFAULTS["seeds"] if args.seeds is None else args.seeds
    args.batch_size = DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    args.out = DEFAULTS["out"] if args.out is None else args.out
    if args.devices < 1:
        raise SystemExit("train: --devices must be >= 1")
    if args.devices > 1:  # before JAX creates its CPU backend (importing jax does not)
        from jax_batchinhib import parallel

        parallel.set_cpu_device_count(args.devices)
    from jax_batchinhib.apps import train

    return train.main(args)


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
