"""``jax-batchinhib train``: the example models on scikit-learn's 8x8 digits.

Every variant is trained for several seeds at once (the seeds are a ``jax.vmap`` axis of
one jitted program), with optax Adam on the mean softmax cross-entropy, on a fixed
75/25 split of the 1797 digits (pixels scaled to [0, 1]; nothing is downloaded: the data
ships inside scikit-learn). After each epoch the test set is evaluated in inference mode
(running statistics). At the end: a table of test accuracy (mean ± std over seeds) and
steps/s, ``curves.png`` (loss and accuracy) and ``results.json`` in ``--out``.

The pieces, so that a data-parallel or other driver can swap one of them:

- :data:`VARIANTS` name -> model factory;
- :func:`train_step` one optimizer step for one seed (a pure function);
- :func:`make_epoch` jit(vmap over seeds(scan over the epoch's batches(train_step)));
- :func:`train_variant` the loop over epochs for one variant.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_batchinhib.apps._xla import run_once_options
from jax_batchinhib.apps.data import load_digits_split
from jax_batchinhib.apps.models import MLP, TwoBranch
from jax_batchinhib.ops import softmax_cross_entropy

DEFAULTS = {"epochs": 15, "seeds": 3, "batch_size": 64, "lr": 3e-3, "out": "out/train"}

HIDDEN = (64, 64)


class InhibMLP(nn.Module):
    """:class:`~jax_batchinhib.apps.models.MLP` with BatchInhib whose ``alpha`` starts at 0:
    full-strength inhibition from the first step (g = log 2 everywhere, R the
    row-normalized correlation), instead of the library's near-identity default
    (alpha = -12, which Adam at lr 3e-3 moves by about 1 in this run's 300 steps, so
    that layer stays within 0.3% of the identity). Same layer names as MLP."""

    features: tuple = HIDDEN
    num_classes: int = 10
    batchnorm: bool = True
    groups: int = 1
    denominator: str = "signed"
    guard_mode: str = "absolute"

    @nn.compact
    def __call__(self, x, *, train: bool):
        from jax_batchinhib import linen as bl

        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.features):
            # no bias before BatchNorm: it has an exactly zero gradient that Adam would
            # turn into round-off moves (docs/scaling.md)
            x = nn.Dense(f, use_bias=not self.batchnorm, name=f"dense{i}")(x)
            if self.batchnorm:
                x = bl.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = bl.BatchInhib(
                use_running_average=not train,
                momentum=0.9,
                groups=self.groups,
                denominator=self.denominator,
                guard_mode=self.guard_mode,
                alpha_init=nn.initializers.zeros,
                name=f"inhib{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name="head")(x)


#: name -> (description, model factory). The order is the table's.
VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "none": ("MLP 64-64, no normalization", lambda: MLP(HIDDEN, norm="none")),
    "flax_batchnorm": (
        "MLP 64-64, flax.linen.BatchNorm",
        lambda: MLP(HIDDEN, norm="flax_batchnorm"),
    ),
    "batchnorm": ("MLP 64-64, our BatchNorm", lambda: MLP(HIDDEN, norm="batchnorm")),
    "batchnorm+inhib": (
        "MLP 64-64, our BatchNorm + BatchInhib",
        lambda: MLP(HIDDEN, norm="batchnorm+inhib"),
    ),
    "inhib_groups4": (
        "MLP 64-64, our BatchInhib, 4 groups of 16",
        lambda: MLP(HIDDEN, norm="inhib", inhib_groups=4),
    ),
    "batchnorm+inhib_a0": (
        "MLP 64-64, our BatchNorm + BatchInhib, alpha init 0",
        lambda: InhibMLP(HIDDEN),
    ),
    "inhib_groups4_a0": (
        "MLP 64-64, our BatchInhib, 4 groups of 16, alpha init 0",
        lambda: InhibMLP(HIDDEN, batchnorm=False, groups=4),
    ),
    "inhib_groups4_a0_abs": (
        'MLP 64-64, our BatchInhib, 4 groups of 16, alpha init 0, denominator="abs"',
        lambda: InhibMLP(HIDDEN, batchnorm=False, groups=4, denominator="abs"),
    ),
    "batchnorm+inhib_a0_abs": (
        'MLP 64-64, our BatchNorm + BatchInhib, alpha init 0, denominator="abs"',
        lambda: InhibMLP(HIDDEN, denominator="abs"),
    ),
    "batchnorm+inhib_a0_rel": (
        'MLP 64-64, our BatchNorm + BatchInhib, alpha init 0, guard_mode="relative"',
        lambda: InhibMLP(HIDDEN, guard_mode="relative"),
    ),
    "inhib_groups4_a0_rel": (
        'MLP 64-64, our BatchInhib, 4 groups of 16, alpha init 0, guard_mode="relative"',
        lambda: InhibMLP(HIDDEN, batchnorm=False, groups=4, guard_mode="relative"),
    ),
    "two_branch": (
        "two-branch network: sin, dropout; BatchCenter, ReLU",
        lambda: TwoBranch(features_a=32, features_b=32, dropout_rate=0.2),
    ),
}


#: What ``train`` runs by default. Left out: full-strength BatchInhib with the seed's
#: signed denominator (``batchnorm+inhib_a0``, ``inhib_groups4_a0``), which diverges on
#: digits (loss in the tens to hundreds, chance accuracy): run them by name to see it.
#: With ``guard_mode="relative"`` (``*_a0_rel``) the signed layer trains (docs/derivations.md).
DEFAULT_VARIANTS = (
    "none",
    "flax_batchnorm",
    "batchnorm",
    "batchnorm+inhib",
    "batchnorm+inhib_a0_abs",
    "batchnorm+inhib_a0_rel",
    "inhib_groups4",
    "inhib_groups4_a0_abs",
    "two_branch",
)

# -------------------------------------------------------------------------- model


class State(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def init_state(model: nn.Module, tx, key, x_example) -> State:
    """Parameters (and running statistics) for one seed."""
    variables = model.init({"params": key, "dropout": key}, x_example, train=False)
    params = variables["params"]
    return State(params, variables.get("batch_stats", {}), tx.init(params))


def loss_and_logits(model, params, batch_stats, x, y, key, num_classes=10):
    """Mean softmax cross-entropy in training mode; returns ``(loss, (logits, new_stats))``."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    logits, new = model.apply(
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    loss = jnp.mean(softmax_cross_entropy(logits, jax.nn.one_hot(y, num_classes)))
    return loss, (logits, new.get("batch_stats", {}))


def train_step(model, tx, state: State, x, y, key):
    """One Adam step for one seed: ``(new_state, (loss, accuracy))`` on the batch.

    A pure function of its arrays; :func:`make_epoch` vmaps it over seeds and scans it
    over an epoch. A data-parallel driver replaces this (e.g. with a ``pmean`` of the
    gradients) and keeps the rest."""
    (loss, (logits, stats)), grads = jax.value_and_grad(
        lambda p: loss_and_logits(model, p, state.batch_stats, x, y, key), has_aux=True
    )(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return State(params, stats, opt_state), (loss, acc)


def evaluate(model, state: State, x, y, num_classes=10):
    """Test loss and accuracy in inference mode (running statistics, no dropout)."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    logits = model.apply(variables, x, train=False)
    loss = jnp.mean(softmax_cross_entropy(logits, jax.nn.one_hot(y, num_classes)))
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def make_epoch(model, tx, step=train_step):
    """``epoch(states, xb, yb, keys, x_test, y_test) -> (states, metrics)``, jitted.

    ``states``: a :class:`State` with a leading seed axis; ``xb`` ``(S, steps, B, 64)``
    and ``yb`` ``(S, steps, B)`` each seed's shuffled batches; ``keys`` ``(S, steps)``
    dropout keys. Metrics per seed: mean train loss and accuracy over the epoch's steps,
    test loss and accuracy after it."""

    def one_seed(state, xb, yb, keys, x_test, y_test):
        def body(s, batch):
            return step(model, tx, s, *batch)

        state, (loss, acc) = jax.lax.scan(body, state, (xb, yb, keys))
        tl, ta = evaluate(model, state, x_test, y_test)
        return state, (jnp.mean(loss), jnp.mean(acc), tl, ta)

    return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, 0, 0, None, None)), donate_argnums=0)


def train_variant(
    name: str,
    data,
    *,
    epochs: int,
    seeds: int,
    batch_size: int,
    lr: float,
    progress: Callable[[], None] | None = None,
    devices: int = 1,
) -> dict:
    """Train ``VARIANTS[name]`` for ``seeds`` seeds at once; returns its curves and
    numbers (per-epoch means over seeds, final test accuracy per seed, steps/s).

    ``devices > 1``: data-parallel over ``jax.devices()[:devices]`` (GSPMD, see
    :mod:`jax_batchinhib.parallel`): each batch is split over the devices, the rest is
    replicated; the curves equal the single-device run's up to float32 round-off."""
    xtr, ytr, xte, yte = data
    model = VARIANTS[name][1]()
    tx = optax.adam(lr)
    n = xtr.shape[0]
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"train: batch_size={batch_size} is larger than the {n} training rows")
    keys = jax.random.split(jax.random.key(0), seeds)
    init = jax.vmap(lambda k, xe: init_state(model, tx, k, xe), in_axes=(0, None))
    states = jax.jit(init, compiler_options=run_once_options())(keys, jnp.asarray(xtr[:batch_size]))
    epoch_fn = make_epoch(model, tx)
    # one shuffle stream per seed: seed i's batches do not depend on how many seeds run
    rngs = [np.random.default_rng(s) for s in range(seeds)]
    xte_j, yte_j = jnp.asarray(xte), jnp.asarray(yte)
    place = jnp.asarray  # where each epoch's batches go: one device, or split over several
    if devices > 1:
        from jax_batchinhib import parallel

        if batch_size % devices:
            raise ValueError(
                f"train: --batch-size {batch_size} must be divisible by --devices {devices}"
            )
        mesh = parallel.make_mesh(devices)
        states, keys, xte_j, yte_j = parallel.replicate((states, keys, xte_j, yte_j), mesh)
        place = functools.partial(parallel.shard_batch, mesh=mesh, batch_axis=2)
    hist = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    times = []
    for e in range(epochs):
        idx = np.stack([rng.permutation(n)[: steps * batch_size] for rng in rngs])
        idx = idx.reshape(seeds, steps, batch_size)
        dkeys = jax.vmap(lambda k, e=e: jax.random.split(jax.random.fold_in(k, e), steps))(keys)
        t0 = time.perf_counter()
        states, metrics = epoch_fn(states, place(xtr[idx]), place(ytr[idx]), dkeys, xte_j, yte_j)
        metrics = jax.device_get(metrics)
        times.append(time.perf_counter() - t0)
        for k, v in zip(hist, metrics, strict=True):
            hist[k].append(np.asarray(v, np.float64))
        if progress is not None:
            progress()
    hist = {k: np.stack(v, axis=1) for k, v in hist.items()}  # (seeds, epochs)
    # steps/s: the first epoch includes compilation, so time the others when there are any;
    # with one epoch there are none, and steps/s includes the compilation (said so below).
    timed = times[1:] if len(times) > 1 else times
    final = hist["test_acc"][:, -1]
    return {
        "variant": name,
        "description": VARIANTS[name][0],
        "test_acc_per_seed": final.tolist(),
        "test_acc_mean": float(final.mean()),
        "test_acc_std": float(final.std(ddof=1)) if seeds > 1 else 0.0,
        "steps_per_s": steps * len(timed) / sum(timed),
        "steps_per_s_includes_compile": len(times) == 1,
        "compile_and_first_epoch_s": times[0],
        "steps_per_epoch": steps,
        "curves": {k: v.tolist() for k, v in hist.items()},
    }


# -------------------------------------------------------------------------- report


def verdict(a: dict, b: dict, n_test: int = 450) -> tuple[float, float, str]:
    """``a`` against ``b``: difference of mean test accuracy (points), its standard error
    over seeds, and 'helps' / 'hurts' / 'ties'.

    'ties' when the difference is within two standard errors over seeds, or within two
    test examples (0.44 points on digits' 450): every seed is scored on the same test
    set, so the spread over seeds does not see the test set's own sampling noise, and
    with few seeds it can be 0 by coincidence."""
    diff = 100 * (a["test_acc_mean"] - b["test_acc_mean"])
    na, nb = len(a["test_acc_per_seed"]), len(b["test_acc_per_seed"])
    se = 100 * math.sqrt(a["test_acc_std"] ** 2 / na + b["test_acc_std"] ** 2 / nb)
    if abs(diff) <= max(2 * se, 100 * 2 / n_test):
        word = "ties"
    else:
        word = "helps" if diff > 0 else "hurts"
    return diff, se, word


def format_table(results: list[dict], seeds: int) -> str:
    """The results as a Markdown table; its steps/s column says when it includes the
    compilation (a run of one epoch, :func:`train_variant`)."""
    compile_ = any(r.get("steps_per_s_includes_compile") for r in results)
    speed = "steps/s (compilation included)" if compile_ else "steps/s"
    lines = [
        f"| variant | model | test accuracy (mean ± std, {seeds} seeds) | {speed} |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['variant']}` | {r['description']} | "
            f"{100 * r['test_acc_mean']:.2f}% ± {100 * r['test_acc_std']:.2f} | "
            f"{r['steps_per_s']:.0f} |"
        )
    return "\n".join(lines)


def comparisons(results: list[dict], n_test: int = 450) -> list[str]:
    by = {r["variant"]: r for r in results}
    out = []
    pairs = [
        ("batchnorm+inhib", "batchnorm", "BatchNorm + BatchInhib vs our BatchNorm"),
        ("inhib_groups4", "none", "BatchInhib (4 groups) vs no normalization"),
        ("inhib_groups4", "batchnorm", "BatchInhib (4 groups) vs our BatchNorm"),
        ("batchnorm+inhib_a0", "batchnorm", "BatchNorm + BatchInhib (alpha 0) vs our BatchNorm"),
        (
            "batchnorm+inhib_a0_abs",
            "batchnorm",
            'BatchNorm + BatchInhib (alpha 0, "abs") vs our BatchNorm',
        ),
        ("inhib_groups4_a0", "none", "BatchInhib (4 groups, alpha 0) vs no normalization"),
        (
            "inhib_groups4_a0_abs",
            "none",
            'BatchInhib (4 groups, alpha 0, "abs") vs no normalization',
        ),
        (
            "batchnorm+inhib_a0_rel",
            "batchnorm",
            'BatchNorm + BatchInhib (alpha 0, "relative" guard) vs our BatchNorm',
        ),
        (
            "batchnorm+inhib_a0_rel",
            "batchnorm+inhib_a0_abs",
            'BatchNorm + BatchInhib (alpha 0): "relative" guard vs "abs"',
        ),
        (
            "inhib_groups4_a0_rel",
            "inhib_groups4_a0_abs",
            'BatchInhib (4 groups, alpha 0): "relative" guard vs "abs"',
        ),
        ("batchnorm", "flax_batchnorm", "our BatchNorm vs flax.linen.BatchNorm"),
    ]
    for a, b, label in pairs:
        if a in by and b in by:
            d, se, w = verdict(by[a], by[b], n_test)
            out.append(f"{label}: {d:+.2f} ± {se:.2f} points -> {w}")
    return out


#: Okabe & Ito's colour-blind-safe palette, its pale yellow last, and grey: nine colours;
#: with more variants than colours the line style and the marker still tell them apart.
OKABE_ITO = (
    "#000000",
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
    "#999999",
    "#F0E442",
)
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot_style(i: int) -> dict:
    """Colour, line style and marker of the ``i``-th variant: no two of the first 36
    variants share all three, and no two of the first 9 share a colour."""
    return {
        "color": OKABE_ITO[i % len(OKABE_ITO)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
    }


def plot(results: list[dict], path: str) -> None:
    """``curves.png``: train loss, test loss and test accuracy per epoch (mean over seeds,
    a band of ± one std), and the final test accuracy of every variant with its std as an
    error bar. Curves that coincide (e.g. flax's BatchNorm and ours) stay visible: each
    variant has its own colour, line style and marker, and the markers of different
    variants sit on different epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    axes = axes.ravel()
    panels = [
        ("train_loss", "train loss (epoch mean)", True),
        ("test_loss", "test loss", True),
        ("test_acc", "test accuracy", False),
    ]
    n = len(results)
    for ax, (key, title, logy) in zip(axes[:3], panels, strict=True):
        for i, r in enumerate(results):
            v = np.asarray(r["curves"][key])
            ep = np.arange(1, v.shape[1] + 1)
            m, s = v.mean(0), v.std(0)
            every = max(1, min(n, v.shape[1] // 3))
            ax.plot(
                ep,
                m,
                label=r["variant"],
                markevery=(i % every, every),
                markersize=6,
                linewidth=1.6,
                **plot_style(i),
            )
            ax.fill_between(ep, m - s, m + s, color=plot_style(i)["color"], alpha=0.12)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    final = [100 * r["test_acc_mean"] for r in results]
    lo = min(80.0, min(final) - 2.0)
    axes[2].set_ylim(max(0.0, lo) / 100, 1.0)

    ax = axes[3]
    for i, r in enumerate(results):
        st = plot_style(i)
        ax.errorbar(
            100 * r["test_acc_mean"],
            n - 1 - i,
            xerr=100 * r["test_acc_std"],
            color=st["color"],
            marker=st["marker"],
            markersize=7,
            capsize=4,
            linestyle="none",
        )
    ax.set_yticks(range(n), [r["variant"] for r in reversed(results)], fontsize=9)
    ax.set_xlabel("final test accuracy (%), mean ± std over seeds")
    ax.set_title("final test accuracy")
    ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(n, 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=10, frameon=False)
    fig.suptitle("scikit-learn digits: mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.025 * -(-n // ncol) + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(variants, *, epochs, seeds, batch_size, lr, quiet=False, devices=1) -> list[dict]:
    """Train ``variants``; returns one result dict per variant (see :func:`train_variant`),
    in order; a variant named twice is trained once."""
    variants = list(dict.fromkeys(variants))
    data = load_digits_split()
    bar = None
    if not quiet:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(variants) * epochs, desc="train", unit="epoch")
        except ImportError:  # pragma: no cover - tqdm is in the [examples] extra
            bar = None
    results = []
    for name in variants:
        if bar is not None:
            bar.set_postfix_str(name)
        results.append(
            train_variant(
                name,
                data,
                epochs=epochs,
                seeds=seeds,
                batch_size=batch_size,
                lr=lr,
                devices=devices,
                progress=None if bar is None else (lambda: bar.update(1)),
            )
        )
    if bar is not None:
        bar.close()
    return results


def uses_batch_statistics(name: str) -> bool:
    """Whether ``VARIANTS[name]`` normalizes by statistics over the rows of a training
    batch (its model keeps ``batch_stats``): such a variant needs batches of at least two
    rows. Only shapes are traced; nothing is computed."""
    model = VARIANTS[name][1]()

    def init():
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, jnp.zeros((2, 64)), train=False)

    return bool(jax.eval_shape(init).get("batch_stats"))


def output_files(*, plot: bool = True) -> list[str]:
    """The files :func:`main` writes in ``--out``: ``results.json`` and, with ``plot``,
    ``curves.png``."""
    return ["results.json", "curves.png"] if plot else ["results.json"]


def check_args(args) -> None:
    """Raise ``ValueError("argument --x: ...")``, naming the option, for a setting of
    parsed ``jax-batchinhib train`` arguments (``--epochs``, ``--seeds``,
    ``--batch-size``, ``--lr``, ``--devices``, with ``--variants``) that :func:`main`
    cannot run with. Nothing is trained; only the digits' row count is read (and, for a
    batch of one row, the variants' shapes are traced)."""
    for flag in ("epochs", "seeds", "batch_size"):
        val = getattr(args, flag)
        if val < 1:
            raise ValueError(f"argument --{flag.replace('_', '-')}: must be >= 1; got {val}")
    if args.batch_size < 2:
        names = [v for v in getattr(args, "variants", ()) if v in VARIANTS]
        stats = [v for v in dict.fromkeys(names) if uses_batch_statistics(v)]
        if stats:
            raise ValueError(
                "argument --batch-size: must be >= 2 when a variant normalizes by "
                f"statistics over the rows of a batch ({', '.join(stats)}), which need more "
                f"than one row; got {args.batch_size}"
            )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"argument --lr: must be a positive number; got {args.lr}")
    devices = getattr(args, "devices", 1)
    if devices < 1:
        raise ValueError(f"argument --devices: must be >= 1; got {devices}")
    n = len(load_digits_split()[1])
    if args.batch_size > n:
        raise ValueError(
            f"argument --batch-size: must be at most the {n} training rows of the digits; "
            f"got {args.batch_size}"
        )
    if args.batch_size % devices:
        raise ValueError(
            f"argument --batch-size: must be divisible by --devices {devices} (each device "
            f"takes an equal share of every batch); got {args.batch_size}"
        )


def main(args) -> int:
    """``jax-batchinhib train`` with parsed ``args``; returns the exit status. A bad
    setting raises ``ValueError`` (:func:`check_args`) before anything is trained."""
    check_args(args)
    t0 = time.perf_counter()
    results = run(
        args.variants,
        epochs=args.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        quiet=args.quiet,
        devices=getattr(args, "devices", 1),
    )
    wall = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    xtr, _, xte, _ = load_digits_split()
    table = format_table(results, args.seeds)
    comp = comparisons(results, xte.shape[0])
    if args.epochs > 1:
        timing = "after the first (compiling) epoch"
    else:
        timing = "compilation included (one epoch: there is no later epoch to time)"
    print()
    print(
        f"digits: {xtr.shape[0]} train / {xte.shape[0]} test, {args.epochs} epochs, "
        f"batch {args.batch_size}, Adam lr {args.lr}; steps/s counts one step of all "
        f"{args.seeds} seeds (vmapped), {timing}; {jax.default_backend()}, {wall:.0f} s in all"
    )
    print(table)
    if comp:
        print()
        print(
            "Differences of mean test accuracy (± standard error over seeds; 'ties' when "
            "within two standard errors or two test digits, 0.44 points):"
        )
        for c in comp:
            print("  " + c)
    summary = {
        "config": {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "devices": getattr(args, "devices", 1),
            "n_train": int(xtr.shape[0]),
            "n_test": int(xte.shape[0]),
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "wall_s": wall,
        },
        "results": results,
        "comparisons": comp,
        "table_markdown": table,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    written = [os.path.join(args.out, "results.json")]
    if not args.no_plot:
        plot(results, os.path.join(args.out, "curves.png"))
        written.append(os.path.join(args.out, "curves.png"))
    print("\nwrote " + ", ".join(written))
    return 0
