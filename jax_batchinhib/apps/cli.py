"""The command line: ``jax-batchinhib {verify,train,bench}`` (also ``python -m jax_batchinhib``).

- ``verify``: every hand-derived VJP against autodiff of its reference, over shapes and
  float32 / float64 / bfloat16; exits 1 if any check is over its tolerance.
- ``train``: the example models on scikit-learn's digits, several variants and seeds.
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

    return verify.main(args)


def _train_parser(sub):
    from jax_batchinhib.apps.train import DEFAULT_VARIANTS, DEFAULTS, VARIANTS

    p = sub.add_parser(
        "train",
        help="train the example models on scikit-learn's digits",
        description="Train every variant on scikit-learn's 8x8 digits (shipped with "
        "scikit-learn, nothing is downloaded) for several seeds; print test accuracy "
        "(mean ± std over seeds) and steps/s; write curves.png and results.json.",
    )
    p.add_argument(
        "--epochs", type=int, default=DEFAULTS["epochs"], help="epochs (default %(default)s)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=DEFAULTS["seeds"],
        help="seeds per variant (default %(default)s)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help="variants to train (default: "
        + ", ".join(DEFAULT_VARIANTS)
        + "); also: "
        + ", ".join(v for v in VARIANTS if v not in DEFAULT_VARIANTS),
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULTS["batch_size"], help="default %(default)s"
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default %(default)s)"
    )
    p.add_argument("--out", default=DEFAULTS["out"], help="output folder (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="data-parallel over this many devices: the GPUs, or on CPU this many host "
        "devices (XLA's host platform device count); the batch size must divide evenly "
        "(default %(default)s)",
    )
    p.set_defaults(func=_run_train)


def _run_train(args, rest):
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
