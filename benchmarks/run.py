"""Run the benchmarks and regenerate BENCHMARKS.md.

    python benchmarks/run.py --full          # all cases; writes benchmarks/results_<platform>.json
                                             # and regenerates BENCHMARKS.md
    python benchmarks/run.py --render        # only regenerate BENCHMARKS.md from
                                             # benchmarks/results_*.json and benchmarks/notes.md
    python benchmarks/run.py --memory        # train-step memory ->
                                             # benchmarks/memory_<platform>.json
    python benchmarks/run.py --scaling       # scaling curves -> benchmarks/scaling_<platform>.json
                                             # and benchmarks/scaling_<platform>.png
    python benchmarks/run.py --full --json out/r.json --markdown out/r.md
                                             # results elsewhere: the committed files and
                                             # BENCHMARKS.md are left alone

Every other flag is ``jax-batchinhib bench``'s (``--quick``, ``--cases``, ``--repeats``, ...);
see ``jax_batchinhib/apps/bench.py``.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from jax_batchinhib.apps import bench  # noqa: E402

OUT = os.path.join(ROOT, "BENCHMARKS.md")
ORDER = {"cpu": 0, "gpu": 1, "cuda": 1, "rocm": 2, "tpu": 3}


def markdown() -> str:
    """BENCHMARKS.md's text from every benchmarks/results_*.json (CPU first), the memory
    and scaling results, and notes.md."""
    results = []
    for path in sorted(glob.glob(os.path.join(HERE, "results_*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    results.sort(key=lambda r: ORDER.get(r["machine"]["platform"], 9))
    memory = [_load(p) for p in sorted(glob.glob(os.path.join(HERE, "memory_*.json")))]
    scaling = []
    for path in sorted(glob.glob(os.path.join(HERE, "scaling_*.json"))):
        png = path[: -len(".json")] + ".png"
        rel = os.path.relpath(png, ROOT) if os.path.exists(png) else None
        scaling.append((_load(path), rel))
    notes_path = os.path.join(HERE, "notes.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else None
    pre_path = os.path.join(HERE, "preamble.md")
    pre = open(pre_path).read() if os.path.exists(pre_path) else None
    return bench.render_markdown(results, notes, memory, scaling, pre)


def render(out: str = OUT) -> str:
    """Write :func:`markdown` to ``out`` (BENCHMARKS.md); returns the path."""
    with open(out, "w") as f:
        f.write(markdown())
    n = len(glob.glob(os.path.join(HERE, "results_*.json")))
    print(f"wrote {out} from {n} results file(s)")
    return out


def _load(path):
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    """Run ``jax-batchinhib bench`` with ``argv``; without ``--json`` (however spelled:
    argparse's own parser reads the options) the results go to
    ``benchmarks/<kind>_<platform>.json`` and BENCHMARKS.md is regenerated from them. With
    ``--json`` or ``--markdown`` the results go where they say and the committed files
    are left alone."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--render"]:
        render()
        return 0
    args = bench.build_parser(prog="benchmarks/run.py").parse_args(argv)  # exits 2 if bad
    own = args.json is None and args.markdown is None and not args.list
    if own:
        import jax

        plat = jax.devices()[0].platform
        kind = "memory" if args.memory else "scaling" if args.scaling else "results"
        argv += ["--json", os.path.join(HERE, f"{kind}_{plat}.json")]
        if kind == "scaling" and args.plot is None:
            argv += ["--plot", os.path.join(HERE, f"scaling_{plat}.png")]
    rc = bench.main(argv)
    if own:
        render()
    return rc


if __name__ == "__main__":
    sys.exit(main())
