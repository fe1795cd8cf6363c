"""``jax-batchinhib train --task mnist1d`` (and ``--task digits --study``): does BatchInhib
help, in which configuration, against what -- under a fair protocol.

Protocol, for every variant (a normalization chain of :mod:`jax_batchinhib.apps.models`):

1. Learning rate: Adam at each value of a grid (``--lrs``, at least 2 values) is trained
   on the training set minus a validation split (25% of the training set, never the
   test set) for ``val_seeds`` seeds, and scored on the validation split after the last
   step; the value with the best mean validation accuracy is chosen.
2. ``--seeds`` seeds are then trained at that learning rate on the whole training set
   and scored on the test set (inference mode, running statistics) after the last step.
3. Each variant is compared with our BatchNorm: the mean over seeds of the per-seed
   difference of test accuracy, with a 95% Student-t confidence interval. Seed ``s``
   of every variant shares its initial weights (the Dense/Conv kernels are drawn from
   the same key by layer name) and its batch order, so the differences are paired by
   seed. The interval is over training randomness (initialisation and batch order) on
   this fixed test set. 'helps' / 'hurts' when the interval excludes 0, else 'ties'.
4. The tables add Holm's correction over the model's family of comparisons (every
   variant against our BatchNorm): the adjusted p-value of the paired t-test and the
   verdict that stands at a family-wise error rate of 5% (:func:`holm`).
5. The baseline's seeds are also trained at every other grid value, and each variant is
   compared with the baseline at the variant's own learning rate as well
   (:func:`compare_with_baseline`): a variant that wins only because its search chose a
   better learning rate than the baseline's is told apart from one that wins at equal
   learning rates.

Speed: one compiled program per variant shape trains all the lanes at once (the grid's
learning rates x seeds, or the final seeds: a ``jax.vmap`` axis, the learning rate an
array argument), scanning ``eval_every`` steps per call (``jax.lax.scan``); variants
that differ only by their initial ``alpha`` share it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from jax_batchinhib.apps._xla import run_once_options
from jax_batchinhib.apps.data import Split, load_digits_split, load_mnist1d, validation_rows
from jax_batchinhib.apps.models import InhibOptions, Mnist1dCNN, Mnist1dMLP
from jax_batchinhib.ops import softmax_cross_entropy

# ------------------------------------------------------------------------ variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """A normalization chain (``norm``, see :func:`jax_batchinhib.apps.models.parse_chain`)
    and its BatchInhib options; ``cnn_only`` variants are skipped on the MLPs."""

    name: str
    description: str
    norm: str
    inhib: InhibOptions = InhibOptions()
    cnn_only: bool = False


NEAR = None  # the module's near-identity alpha init
A0 = 0.0  # full strength from the first step


def _bi(name, desc, denominator, guard_mode, alpha_init, norm="batchnorm+inhib", **kw):
    return Variant(name, desc, norm, InhibOptions(denominator, guard_mode, alpha_init, **kw))


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("none", "no normalization", "none"),
        Variant("flax_bn", "flax.linen.BatchNorm", "flax_batchnorm"),
        Variant("bn", "our BatchNorm", "batchnorm"),
        # BatchNorm + BatchInhib (before the ReLU): denominator x guard x alpha init
        _bi("bn+bi_signed_abs_near", "BN+BI signed, absolute guard, near-identity (default)",
            "signed", "absolute", NEAR),
        _bi("bn+bi_signed_abs_a0", "BN+BI signed, absolute guard, alpha 0", "signed",
            "absolute", A0),
        _bi("bn+bi_signed_rel_near", "BN+BI signed, relative guard, near-identity", "signed",
            "relative", NEAR),
        _bi("bn+bi_signed_rel_a0", "BN+BI signed, relative guard, alpha 0", "signed",
            "relative", A0),
        _bi("bn+bi_abs_abs_near", "BN+BI |D|, absolute guard, near-identity", "abs",
            "absolute", NEAR),
        _bi("bn+bi_abs_abs_a0", "BN+BI |D|, absolute guard, alpha 0", "abs", "absolute", A0),
        _bi("bn+bi_abs_rel_near", "BN+BI |D|, relative guard, near-identity", "abs",
            "relative", NEAR),
        _bi("bn+bi_abs_rel_a0", "BN+BI |D|, relative guard, alpha 0", "abs", "relative", A0),
        # rho, groups
        _bi("bn+bi_abs_abs_a0_rho4", "BN+BI |D|, absolute guard, alpha 0, rho 4", "abs",
            "absolute", A0, rho=4.0),
        Variant("bn+bi_abs_abs_a0_g5", "BN+BI |D|, absolute guard, alpha 0, 5 groups",
                "batchnorm+inhib", InhibOptions("abs", "absolute", A0, groups=5), cnn_only=True),
        # BatchInhib alone; placements
        _bi("bi_abs_abs_a0", "BI alone |D|, absolute guard, alpha 0", "abs", "absolute", A0,
            norm="inhib"),
        _bi("bi+bn_abs_abs_a0", "BI before BN |D|, absolute guard, alpha 0", "abs",
            "absolute", A0, norm="inhib+batchnorm"),
        _bi("bn+relu+bi_abs_abs_a0", "BI after the ReLU |D|, absolute guard, alpha 0", "abs",
            "absolute", A0, norm="batchnorm+relu+inhib"),
        # the whitening layers BatchInhib competes with (groups: the model's whiten_groups)
        Variant("iternorm", "IterNorm (5 Newton steps), grouped", "iternorm"),
        Variant("zca", "ZCA whitening (decorrelated BN), grouped", "zca"),
    ]
}  # fmt: skip

#: what a full study runs (every variant; ``cnn_only`` ones on the CNN only)
DEFAULT_VARIANTS = tuple(VARIANTS)
#: what ``--quick`` runs
QUICK_VARIANTS = ("bn", "bn+bi_abs_abs_a0")

#: the variant every other one is compared with
BASELINE = "bn"

#: the defaults of a full study (``jax-batchinhib train --task mnist1d``)
DEFAULTS = {
    "mnist1d": {
        "models": ("mlp", "cnn"),
        "steps": 1500,
        "batch_size": 100,
        "eval_every": 250,
        "lrs": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        "val_seeds": 2,
        "seeds": 10,
    },
    "digits": {
        "models": ("mlp",),
        "steps": 600,
        "batch_size": 64,
        "eval_every": 100,
        "lrs": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        "val_seeds": 2,
        "seeds": 10,
    },
}

QUICK = {"steps": 40, "eval_every": 20, "lrs": (3e-3, 1e-2, 3e-2, 1e-1), "val_seeds": 1, "seeds": 4}

#: published MNIST-1D test accuracy (Greydanus 2020, the repository's README), percent
PUBLISHED = {"logistic regression": 32, "MLP": 68, "CNN": 94, "GRU": 91}


def make_model(task: str, model: str, v: Variant) -> nn.Module:
    if model == "cnn":
        return Mnist1dCNN(norm=v.norm, inhib=v.inhib)
    if task == "digits":
        return Mnist1dMLP(features=(64, 64), norm=v.norm, inhib=v.inhib, residual=False)
    return Mnist1dMLP(norm=v.norm, inhib=v.inhib)


def variants_for(model: str, names: Sequence[str]) -> list[Variant]:
    return [VARIANTS[n] for n in names if model == "cnn" or not VARIANTS[n].cnn_only]


# ------------------------------------------------------------------------ engine


class State(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


TX = optax.scale_by_adam()  # Adam's direction; the learning rate is a per-lane array


def _forward(model, params, stats, x, train):
    v = {"params": params, "batch_stats": stats} if stats else {"params": params}
    if train:
        return model.apply(v, x, train=True, mutable=["batch_stats"])
    return model.apply(v, x, train=False), None


def _step(model, state: State, lr, x, y):
    def loss_fn(p):
        logits, new = _forward(model, p, state.batch_stats, x, True)
        loss = jnp.mean(softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)))
        return loss, (logits, new.get("batch_stats", {}))

    (loss, (logits, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    upd, opt = TX.update(g, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, upd)
    return State(params, stats, opt), (loss, jnp.mean(jnp.argmax(logits, -1) == y))


@functools.cache
def compiled(model: nn.Module):
    """``(chunk, evaluate)`` for ``model``, jitted, lanes vmapped; cached by the model's
    structure (variants that differ by ``alpha_init`` only share them).

    ``chunk(states, lr (L,), idx (L, k, B), x, y)`` runs k steps per lane (batch rows
    ``idx`` of the shared ``x``, ``y``) and returns the states and each lane's mean
    training loss and accuracy over the k steps. ``evaluate(states, x, y)``: each lane's
    loss and accuracy in inference mode."""

    def lane(state, lr, idx, x, y):
        def body(s, i):
            return _step(model, s, lr, x[i], y[i])

        state, (loss, acc) = jax.lax.scan(body, state, idx)
        return state, jnp.mean(loss), jnp.mean(acc)

    def ev(state, x, y):
        logits, _ = _forward(model, state.params, state.batch_stats, x, False)
        loss = jnp.mean(softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)))
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    chunk = jax.jit(jax.vmap(lane, in_axes=(0, 0, 0, None, None)), donate_argnums=0)
    evaluate = jax.jit(jax.vmap(ev, in_axes=(0, None, None)))
    return chunk, evaluate


def structural(model: nn.Module) -> nn.Module:
    return model.clone(inhib=model.inhib.structural(), parent=None)


@functools.cache
def _init_program(model: nn.Module):
    def one(k, x_example):
        v = model.init(k, x_example, train=False)
        return State(v["params"], v.get("batch_stats", {}), TX.init(v["params"]))

    # one program, compiled for a single run (op by op, flax's init compiled each of its
    # primitives: 10-12 s per process on the 2-core CPU; this compiles in under 1 s)
    return jax.jit(jax.vmap(one, in_axes=(0, None)), compiler_options=run_once_options())


def init_states(model: nn.Module, seeds: Sequence[int], x_example) -> State:
    """Each lane's initial parameters from ``jax.random.key(seed)``: the same seed gives
    the same Dense/Conv kernels in every variant (flax draws them by layer name)."""
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    return _init_program(model)(keys, x_example)


def batch_order(seed: int, n: int, steps: int, batch_size: int) -> np.ndarray:
    """``(steps, batch_size)`` row indices: a fresh permutation of the n rows per epoch
    (the last partial batch of each epoch dropped), from numpy's generator at ``seed``."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_order: batch_size must be in [1, n={n}]; got {batch_size}")
    rng = np.random.default_rng(seed)
    per = n // batch_size
    epochs = -(-steps // per)
    idx = np.concatenate([rng.permutation(n)[: per * batch_size] for _ in range(epochs)])
    return idx.reshape(-1, batch_size)[:steps].astype(np.int32)


def train_lanes(
    model: nn.Module,
    data: Split,
    lrs: Sequence[float],
    seeds: Sequence[int],
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    progress: Callable[[int], None] | None = None,
    keep_states: bool = False,
    score_train: bool = True,
    train_rows: np.ndarray | None = None,
) -> dict:
    """Train one lane per ``(lr, seed)`` pair on ``data``'s train part; every
    ``eval_every`` steps score every lane on ``data``'s test part. Returns numpy curves
    ``(L, evals)``: ``steps``, ``train_loss``, ``train_acc`` (batch means over the last
    ``eval_every`` steps), ``eval_loss``, ``eval_acc``; with ``score_train`` the final
    accuracy on the whole train part ``final_train_acc`` (L,); ``eval_acc`` at the last
    step ``final_eval_acc``; ``seconds``; with ``keep_states`` the final states.

    ``train_rows``: train on these rows of ``data``'s train part only (the batches are
    those of a train part made of just these rows); the arrays keep their full shape, so
    the learning-rate search and the final runs share one compiled program."""
    if len(lrs) != len(seeds):
        raise ValueError("train_lanes: lrs and seeds must have the same length")
    chunk, evaluate = compiled(structural(model))
    xtr, ytr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xev, yev = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    states = init_states(model, seeds, xtr[:batch_size])
    rows = np.arange(len(data.y_train)) if train_rows is None else np.asarray(train_rows)
    order = np.stack([rows[batch_order(s, len(rows), steps, batch_size)] for s in seeds])
    lr = jnp.asarray(lrs, jnp.float32)
    curves = {k: [] for k in ("steps", "train_loss", "train_acc", "eval_loss", "eval_acc")}
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        k = min(eval_every, steps - done)
        states, tl, ta = chunk(states, lr, jnp.asarray(order[:, done : done + k]), xtr, ytr)
        done += k
        el, ea = evaluate(states, xev, yev)
        names = ("train_loss", "train_acc", "eval_loss", "eval_acc")
        for key, val in zip(names, (tl, ta, el, ea), strict=True):
            curves[key].append(np.asarray(val, np.float64))
        curves["steps"].append(done)
        if progress is not None:
            progress(k)
    out = {k: np.stack(v, axis=1) for k, v in curves.items() if k != "steps"}
    out["steps"] = np.asarray(curves["steps"])
    if score_train:
        r = jnp.asarray(rows)
        out["final_train_acc"] = np.asarray(evaluate(states, xtr[r], ytr[r])[1], np.float64)
    out["final_eval_acc"] = out["eval_acc"][:, -1]
    out["seconds"] = time.perf_counter() - t0
    if keep_states:
        out["states"] = states
    return out


# ------------------------------------------------------------------------ statistics


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``inf`` below 1)."""
    return math.inf if df < 1 else float(scipy.stats.t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), math.inf
    return float(v.mean()), t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a - b`` paired by seed: mean difference, its 95% t interval, the verdict
    'helps' (interval above 0) / 'hurts' (below 0) / 'ties', and the two-sided p-value of
    the paired t-test (the interval excludes 0 exactly when ``p < 0.05``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired_difference: the two runs must have one accuracy per seed, as many "
            f"seeds each, at least one; got {a.size} and {b.size}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(
            f"paired_difference: accuracies must be finite; got {a.tolist()} and {b.tolist()}"
        )
    d = a - b
    m, h = mean_ci(d)
    word = "helps" if m - h > 0 else "hurts" if m + h < 0 else "ties"
    if d.size < 2:
        p = 1.0
    elif float(d.std(ddof=1)) == 0.0:  # every seed moved by the same amount
        p = 1.0 if m == 0.0 else 0.0
    else:
        p = float(scipy.stats.ttest_1samp(d, 0.0).pvalue)
    return {"diff": m, "ci_low": m - h, "ci_high": m + h, "verdict": word, "p": p, "paired": True}


def _lr_key(lr: float) -> str:
    """A learning rate as a JSON key, the shortest string that reads back as the same float:
    ``0.003`` -> ``"0.003"`` (two different floats never share a key)."""
    return repr(float(lr))


def _baseline_seeds(base: dict, r: dict, same_lr: bool) -> list[float] | None:
    """The baseline's per-seed test accuracies that variant ``r`` is compared with: at the
    baseline's own chosen learning rate, or (``same_lr``) at ``r``'s; ``None`` when the
    baseline did not run at that value."""
    if not same_lr:
        return base["test_acc_per_seed"]
    per_lr = base.get("test_acc_per_seed_per_lr")
    return None if per_lr is None else per_lr.get(_lr_key(r["lr"]))


def compare_with_baseline(variants: list[dict]) -> None:
    """Each variant's paired comparisons with our BatchNorm, set in place: ``vs_bn``, against
    the baseline at the baseline's chosen learning rate (each layer at its best), and
    ``vs_bn_same_lr``, against the baseline trained at this variant's chosen learning rate
    (when the baseline ran at every grid value), which separates what the layer does
    from what its learning rate does."""
    base = next((r for r in variants if r["variant"] == BASELINE), None)
    for r in variants:
        r.pop("vs_bn", None)
        r.pop("vs_bn_same_lr", None)
        if base is None or r is base:
            continue
        for key, same in (("vs_bn", False), ("vs_bn_same_lr", True)):
            ref = _baseline_seeds(base, r, same)
            if ref is None:
                continue
            try:
                r[key] = paired_difference(r["test_acc_per_seed"], ref)
            except ValueError as e:
                raise ValueError(f"{r['variant']} against {BASELINE}: {e}") from None


def holm(variants: Sequence[dict], alpha: float = 0.05, *, same_lr: bool = False) -> dict:
    """Holm's step-down correction over one model's comparisons with our BatchNorm.

    ``variants``: the model's result rows, their comparisons set by
    :func:`compare_with_baseline`; each ``vs_bn`` (``same_lr``: each ``vs_bn_same_lr``)
    is one comparison of the family. Returns, per variant name, the Holm-adjusted p-value
    (``p_holm``: the family-wise error rate at which its verdict would stand), the family
    size ``k`` and the verdict at family-wise level ``alpha``: 'helps' / 'hurts' where the
    adjusted p is at most ``alpha``, else 'ties'."""
    key = "vs_bn_same_lr" if same_lr else "vs_bn"
    tests = [(r["variant"], r[key]) for r in variants if key in r]
    k = len(tests)
    out, running = {}, 0.0
    for i, (name, c) in enumerate(sorted(tests, key=lambda t: t[1]["p"])):
        running = max(running, min(1.0, (k - i) * c["p"]))  # monotone step-down
        word = ("helps" if c["diff"] > 0 else "hurts") if running <= alpha else "ties"
        out[name] = {"p_holm": running, "k": k, "verdict": word}
    return out


# ------------------------------------------------------------------------ protocol


def run_variant(
    task: str,
    model_kind: str,
    v: Variant,
    full: Split,
    val_rows: tuple[np.ndarray, np.ndarray],
    cfg: dict,
    *,
    progress=None,
    keep_states: bool = False,
    every_lr: bool = False,
) -> dict:
    """The protocol for one variant: choose the learning rate on the validation split
    (``val_rows``: the training rows kept for training and those carved out for
    validation, :func:`jax_batchinhib.apps.data.validation_rows`), then train
    ``cfg['seeds']`` seeds on ``full`` and score them on its test part. ``every_lr`` (the
    baseline): also train those seeds at every other grid value, their test accuracies in
    ``test_acc_per_seed_per_lr`` (keyed by :func:`_lr_key`), so that every variant can be
    compared with the baseline at the variant's own learning rate."""
    keep, held = val_rows
    val = Split(full.x_train, full.y_train, full.x_train[held], full.y_train[held])
    model = make_model(task, model_kind, v)
    common = dict(steps=cfg["steps"], batch_size=cfg["batch_size"], eval_every=cfg["eval_every"])
    lrs, vs = list(cfg["lrs"]), cfg["val_seeds"]
    lane_lrs = [lr for lr in lrs for _ in range(vs)]
    lane_seeds = [1000 + s for _ in lrs for s in range(vs)]  # not the test seeds
    g = train_lanes(
        model,
        val,
        lane_lrs,
        lane_seeds,
        progress=progress,
        score_train=False,
        train_rows=keep,
        **common,
    )
    val_acc = g["final_eval_acc"].reshape(len(lrs), vs)
    ok = np.isfinite(val_acc).all(axis=1)
    score = np.where(ok, val_acc.mean(axis=1), -np.inf)
    best = int(np.argmax(score))
    lr = lrs[best]
    seeds = list(range(cfg["seeds"]))
    f = train_lanes(
        model, full, [lr] * len(seeds), seeds, progress=progress, keep_states=keep_states, **common
    )
    test = f["final_eval_acc"]
    train = f["final_train_acc"]
    per_lr = None
    if every_lr:  # the same seeds at the grid's other values, for same-lr comparisons
        acc = {lr: test}
        others = [x for x in lrs if x != lr]
        if others:
            o = train_lanes(
                model, full, [x for x in others for _ in seeds], seeds * len(others), **common
            )
            acc.update(
                zip(others, o["final_eval_acc"].reshape(len(others), len(seeds)), strict=True)
            )
        per_lr = {_lr_key(x): np.asarray(acc[x]).tolist() for x in lrs}
    out = {
        "variant": v.name,
        "description": v.description,
        "norm": v.norm,
        "inhib": dataclasses.asdict(v.inhib) if "inhib" in v.norm else None,
        "lr_grid": lrs,
        "val_acc_per_lr": val_acc.mean(axis=1).tolist(),
        "val_acc_per_lr_seed": val_acc.tolist(),
        "lr": lr,
        "val_acc": float(val_acc[best].mean()),
        "seeds": seeds,
        "test_acc_per_seed": test.tolist(),
        "train_acc_per_seed": train.tolist(),
        "test_acc_mean": float(test.mean()),
        "test_acc_std": float(test.std(ddof=1)) if len(seeds) > 1 else 0.0,
        "test_acc_ci95": mean_ci(test)[1],
        "train_acc_mean": float(train.mean()),
        "train_acc_std": float(train.std(ddof=1)) if len(seeds) > 1 else 0.0,
        "curves": {
            "steps": f["steps"].tolist(),
            "test_acc": f["eval_acc"].mean(0).tolist(),
            "train_batch_acc": f["train_acc"].mean(0).tolist(),
            "train_loss": f["train_loss"].mean(0).tolist(),
            "val_acc_chosen_lr": g["eval_acc"].reshape(len(lrs), vs, -1)[best].mean(0).tolist(),
        },
        "seconds": {"lr_search": g["seconds"], "final": f["seconds"]},
    }
    if per_lr is not None:
        out["test_acc_per_seed_per_lr"] = per_lr
    if keep_states:
        out["_states"] = f["states"]
    return out


#: MNIST-1D examples generated (train and test), by ``quick``
MNIST1D_SAMPLES = {False: 5000, True: 1000}


def load_task(task: str, quick: bool) -> Split:
    if task == "digits":
        return Split(*load_digits_split())
    return load_mnist1d(MNIST1D_SAMPLES[quick])


def n_train_rows(task: str, quick: bool) -> int:
    """The number of training rows of :func:`load_task` (without generating MNIST-1D)."""
    if task == "digits":
        return len(load_digits_split()[1])
    from mnist1d.data import get_dataset_args

    return int(MNIST1D_SAMPLES[quick] * get_dataset_args().train_split)


def for_model(data: Split, model_kind: str) -> Split:
    """``(B, L)`` signals as ``(B, L, 1)`` for the CNN (channels last)."""
    if model_kind != "cnn" or data.x_train.ndim != 2:
        return data
    return data._replace(x_train=data.x_train[..., None], x_test=data.x_test[..., None])


HEATMAP_VARIANT = "bn+bi_abs_abs_a0"


def run_model(
    task: str,
    model_kind: str,
    names: Sequence[str],
    cfg: dict,
    *,
    quick: bool = False,
    quiet: bool = False,
    partial_path: str | None = None,
    position: int = 0,
    data: Split | None = None,
) -> dict:
    """Every variant of ``names`` on one model: ``{"n_train", "n_val", "n_test",
    "variants"}``, with the heatmap data of :data:`HEATMAP_VARIANT` (numpy, from
    :func:`inhib_heatmap_data`) under the private key ``_heatmap`` when it ran.
    ``data``: the task's data if already loaded (:func:`load_task`), else loaded here."""
    vs = variants_for(model_kind, names)
    bar = None
    if not quiet:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(vs) * cfg["steps"] * 2, desc=f"{task} {model_kind}",
                       unit="step", position=position)  # fmt: skip
        except ImportError:  # pragma: no cover - tqdm is in the [examples] extra
            bar = None
    full = for_model(load_task(task, quick) if data is None else data, model_kind)
    val_rows = validation_rows(len(full.y_train), 0.25, seed=0)
    res, heat = [], None
    for v in vs:
        if bar is not None:
            bar.set_postfix_str(v.name)
        keep = v.name == HEATMAP_VARIANT
        r = run_variant(
            task,
            model_kind,
            v,
            full,
            val_rows,
            cfg,
            progress=None if bar is None else bar.update,
            keep_states=keep,
            every_lr=v.name == BASELINE,
        )
        if keep:
            heat = inhib_heatmap_data(make_model(task, model_kind, v), r.pop("_states"), full)
        res.append(r)
        if partial_path is not None:  # what is done so far, in case the run is cut off
            with open(partial_path, "w") as f:
                json.dump({"task": task, "model": model_kind, "cfg": cfg, "variants": res}, f)
    if bar is not None:
        bar.close()
    compare_with_baseline(res)
    out = {
        "n_train": int(full.x_train.shape[0]),
        "n_val": len(val_rows[1]),
        "n_test": int(full.x_test.shape[0]),
        "variants": res,
    }
    if heat is not None:
        out["_heatmap"] = heat
    return out


def _run_model_job(args: tuple) -> dict:
    task, mk, names, cfg, kw = args
    return run_model(task, mk, names, cfg, **kw)


def run_study(
    task: str,
    models: Sequence[str],
    names: Sequence[str],
    cfg: dict,
    *,
    quick: bool = False,
    quiet: bool = False,
    partial_path: str | None = None,
    jobs: int = 1,
) -> dict:
    """Every variant of ``names`` on every model of ``models`` for ``task``; returns the
    results dictionary written to ``results.json`` (each model's heatmap data under the
    private key ``_heatmap``). ``jobs`` > 1 runs the models in that many processes at
    once (each model's programs are single-process; XLA:CPU keeps about 1.2 cores busy
    with these small shapes, so two models share two cores well)."""

    # generated once here, not in each model's process (MNIST-1D's generator is numpy:
    # 5.6 s for the quick run's 1,000 signals on the 2-core CPU)
    data = load_task(task, quick)

    def kw(i, mk):
        part = None if partial_path is None else f"{partial_path}.{mk}"
        return {"quiet": quiet, "partial_path": part, "position": i, "data": data}

    jobs_list = [(task, mk, tuple(names), cfg, kw(i, mk)) for i, mk in enumerate(models)]
    if jobs > 1 and len(models) > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # JAX must not be forked
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(models)), ctx) as ex:
            done = list(ex.map(_run_model_job, jobs_list))
    else:
        done = [_run_model_job(j) for j in jobs_list]
    out: dict = {"task": task, "models": {}}
    for mk, r in zip(models, done, strict=True):
        if "_heatmap" in r:
            out.setdefault("_heatmap", {})[mk] = r.pop("_heatmap")
        out["models"][mk] = r
    return out


# ------------------------------------------------------------------------ plots

#: Okabe & Ito's colour-blind-safe palette
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
             "#CC79A7")  # fmt: skip
VERDICT_COLOUR = {"helps": "#009E73", "hurts": "#D55E00", "ties": "#0072B2", "baseline": "#000000"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(study: dict, path: str) -> None:
    """Test accuracy per variant: mean and 95% interval over seeds (a row per variant,
    coloured by the verdict against our BatchNorm), one panel per model."""
    plt = _plt()
    models = list(study["models"])
    nmax = max(len(study["models"][m]["variants"]) for m in models)
    height = 0.34 * nmax + 2.2
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), height), squeeze=False)
    for ax, mk in zip(axes[0], models, strict=True):
        res = study["models"][mk]["variants"]
        for i, r in enumerate(res):
            m, h = 100 * r["test_acc_mean"], 100 * r["test_acc_ci95"]
            word = r.get("vs_bn", {}).get("verdict", "baseline")
            c = VERDICT_COLOUR[word]
            ax.errorbar(m, i, xerr=h, fmt="o", color=c, ms=5, capsize=3)
            ax.plot(100 * np.asarray(r["test_acc_per_seed"]), [i] * len(r["seeds"]), "|",
                    color=c, alpha=0.5, ms=7)  # fmt: skip
        base = next((r for r in res if r["variant"] == BASELINE), None)
        if base is not None:
            ax.axvline(100 * base["test_acc_mean"], color="#000000", lw=0.8, ls=":")
        ax.set_yticks(range(len(res)), [f"{r['variant']}  (lr {r['lr']:g})" for r in res],
                      fontsize=8)  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%): mean, 95% CI over seeds, ticks = seeds")
        ax.set_title(f"{study['task']} {mk.upper()}")
        ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, marker="o", ls="", label=w) for w, c in VERDICT_COLOUR.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False,
               title="paired difference from our BatchNorm (95% CI)", title_fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1))  # 0.75 inch for the legend
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(study: dict, path: str) -> None:
    """Learning curves at the chosen learning rate (mean over seeds): test accuracy and
    training batch accuracy per variant, a row per model. Colours from Okabe & Ito's
    palette, cycled with line styles so every variant has its own line."""
    plt = _plt()
    models = list(study["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.3 * len(models)), squeeze=False)
    styles = ("-", "--", ":", "-.")
    for row, mk in zip(axes, models, strict=True):
        res = study["models"][mk]["variants"]
        for i, r in enumerate(res):
            c = OKABE_ITO[i % len(OKABE_ITO)]
            ls = styles[(i // len(OKABE_ITO)) % len(styles)]
            s = r["curves"]["steps"]
            row[0].plot(s, 100 * np.asarray(r["curves"]["test_acc"]), color=c, ls=ls,
                        label=r["variant"])  # fmt: skip
            row[1].plot(s, 100 * np.asarray(r["curves"]["train_batch_acc"]), color=c, ls=ls)
        row[0].set_title(f"{study['task']} {mk.upper()}: test accuracy (chosen lr)")
        row[1].set_title(f"{study['task']} {mk.upper()}: training batch accuracy")
        for ax in row:
            ax.set_xlabel("step")
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inhib_heatmap_data(model: nn.Module, states: State, data: Split, lane: int = 0) -> dict:
    """For the first BatchInhib layer of ``model`` (lane ``lane`` of ``states``), in
    inference mode on ``data``'s test part: the correlation of the features going in
    and coming out, and R from the layer's running covariance."""
    from jax_batchinhib.ops import inhibition_matrix

    st = jax.tree.map(lambda a: a[lane], states)
    v = {"params": st.params, "batch_stats": st.batch_stats}
    apply = jax.jit(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])[1],
        compiler_options=run_once_options(),
    )  # one program (op by op, this forward compiled each primitive: 7 s for the CNN)
    inter = apply(v, jnp.asarray(data.x_test))
    layer = inter["intermediates"]["norm0"]
    xin = np.asarray(layer["inhib_in0"][0]).reshape(-1, layer["inhib_in0"][0].shape[-1])
    xout = np.asarray(layer["inhib_out0"][0]).reshape(xin.shape)
    o = model.inhib
    R = inhibition_matrix(
        st.batch_stats["norm0"]["inhib0"]["cov"],
        st.params["norm0"]["inhib0"]["alpha"],
        rho=o.rho,
        groups=o.groups,
        denominator=o.denominator,
        guard=o.guard,
        guard_mode=o.guard_mode,
    )
    R = np.asarray(R)
    if R.shape[0] == 1:
        R = R[0]
    else:  # block-diagonal
        n = R.shape[0] * R.shape[1]
        full = np.zeros((n, n))
        for g in range(R.shape[0]):
            sl = slice(g * R.shape[1], (g + 1) * R.shape[1])
            full[sl, sl] = R[g]
        R = full

    def corr(a):
        c = np.corrcoef(a, rowvar=False)
        return np.nan_to_num(c)

    cin, cout = corr(xin), corr(xout)
    off = ~np.eye(cin.shape[0], dtype=bool)
    return {
        "corr_in": cin,
        "corr_out": cout,
        "R": R,
        "mean_abs_offdiag_corr_in": float(np.abs(cin[off]).mean()),
        "mean_abs_offdiag_corr_out": float(np.abs(cout[off]).mean()),
    }


def plot_heatmaps(h: dict, title: str, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [
        (h["corr_in"], f"correlation in (mean |off-diag| {h['mean_abs_offdiag_corr_in']:.3f})"),
        (h["corr_out"], f"correlation out (mean |off-diag| {h['mean_abs_offdiag_corr_out']:.3f})"),
        (h["R"], "R (y = x - x R^T), running covariance"),
    ]
    for ax, (m, t) in zip(axes, panels, strict=True):
        lim = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)  # diverging, colour-blind safe
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("feature")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------ report


def diff_cell(c: dict) -> str:
    """A paired comparison as table text, in points: ``+1.49 [+0.28, +2.70]``."""
    return f"{100 * c['diff']:+.2f} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"


def format_tables(study: dict) -> str:
    """The study's tables (Markdown), a table per model: per variant, the chosen learning
    rate, test and train accuracy, the paired comparison with our BatchNorm and its
    verdict, Holm's correction of that verdict over the model's comparisons, and (when the
    baseline ran at every grid value) the comparison with our BatchNorm trained at the
    variant's own learning rate, with its verdict and Holm's."""
    lines = []
    for mk, m in study["models"].items():
        res = m["variants"]
        n = len(res[0]["seeds"])
        corrected = holm(res)
        same = holm(res, same_lr=True)
        k = len(corrected)
        head = (
            "| variant | lr (val acc) | test acc, mean ± std | train acc | vs our BatchNorm "
            f"(paired, 95% CI) | verdict | Holm-adjusted p over {k}: verdict |"
        )
        rule = "|---|---|---|---|---|---|---|"
        if same:
            head += " vs our BatchNorm at the same lr: 95% CI, verdict; Holm |"
            rule += "---|"
        lines += [
            f"**{study['task']} {mk.upper()}** ({m['n_train']} train / {m['n_test']} test; "
            f"learning rate chosen on {m['n_val']} validation rows; {n} seeds)",
            "",
            head,
            rule,
        ]
        for r in res:
            c = r.get("vs_bn")
            h = corrected.get(r["variant"])
            adj = f"{h['p_holm']:.3g}: {h['verdict']}" if h else "—"
            row = (
                f"| `{r['variant']}` | {r['lr']:g} ({100 * r['val_acc']:.1f}%) | "
                f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
                f"{100 * r['train_acc_mean']:.1f} | {diff_cell(c) if c else '—'} | "
                f"{c['verdict'] if c else 'baseline'} | "
                f"{adj} |"
            )
            if same:
                c2, h2 = r.get("vs_bn_same_lr"), same.get(r["variant"])
                row += (
                    f" {diff_cell(c2)} {c2['verdict']}; {h2['p_holm']:.3g} {h2['verdict']} |"
                    if c2
                    else " — |"
                )
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def _jsonable(study: dict) -> dict:
    return {k: v for k, v in study.items() if not k.startswith("_")}


def config_from_args(args) -> dict:
    """The study's settings from parsed ``jax-batchinhib train`` arguments: ``{"cfg",
    "models", "variants", "jobs"}`` (``cfg`` as :data:`DEFAULTS`, with ``--quick``'s and
    the given options; without ``--eval-every``, its default cut to ``steps``). Raises
    ``ValueError`` naming the option for a value the study cannot run with; nothing is
    loaded or trained."""
    task = args.task
    quick = bool(getattr(args, "quick", False))
    cfg = dict(DEFAULTS[task])
    if quick:
        cfg.update(QUICK)
    for flag in ("steps", "batch_size", "eval_every", "seeds", "val_seeds"):
        val = getattr(args, flag, None)
        if val is not None:
            if val < 1:
                raise ValueError(f"argument --{flag.replace('_', '-')}: must be >= 1; got {val}")
            cfg[flag] = val
    if cfg["seeds"] < 2:
        raise ValueError(
            f"argument --seeds: the study compares variants by a paired 95% interval over "
            f"seeds, which needs at least 2 seeds; got {cfg['seeds']}"
        )
    lrs = getattr(args, "lrs", None)
    if lrs is not None:
        if len(lrs) < 2 or not all(math.isfinite(lr) and lr > 0 for lr in lrs):
            raise ValueError(f"argument --lrs: needs at least 2 positive values; got {list(lrs)}")
        if len({_lr_key(lr) for lr in lrs}) != len(lrs):
            raise ValueError(f"argument --lrs: the values must be distinct; got {list(lrs)}")
        cfg["lrs"] = tuple(lrs)
    if getattr(args, "eval_every", None) is None:  # the default: at most the steps
        cfg["eval_every"] = min(cfg["eval_every"], cfg["steps"])
    if cfg["eval_every"] > cfg["steps"]:
        raise ValueError(
            f"argument --eval-every: at most the number of steps ({cfg['steps']}); "
            f"got {cfg['eval_every']}"
        )
    n = n_train_rows(task, quick)
    rows = len(validation_rows(n, 0.25, seed=0)[0])
    if cfg["batch_size"] > rows:
        raise ValueError(
            f"argument --batch-size: {cfg['batch_size']} is larger than the {rows} rows the "
            f"learning-rate search trains on (--task {task}{' --quick' if quick else ''}: "
            f"{n} training rows, 25% of them held out for validation)"
        )
    models = getattr(args, "model", None)
    models = models or (("mlp",) if quick and task == "digits" else cfg["models"])
    models = tuple(dict.fromkeys(models))  # a model named twice runs once
    if task == "digits" and "cnn" in models:
        raise ValueError("argument --model: --task digits has the MLP only (--model mlp)")
    if cfg["batch_size"] < 2 and "mlp" in models:
        raise ValueError(
            f"argument --batch-size: must be >= 2 with the MLP: the baseline {BASELINE} (our "
            "BatchNorm, always run) takes statistics over the rows of a batch, which need "
            f"more than one row; got {cfg['batch_size']}"
        )
    names = getattr(args, "variants", None) or (QUICK_VARIANTS if quick else DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"argument --variants: invalid choice: {unknown[0]!r} for the study (choose "
            f"from {', '.join(VARIANTS)})"
        )
    names = list(dict.fromkeys(names))
    if getattr(args, "variants", None) and "cnn" not in models:
        cnn_only = [n for n in names if VARIANTS[n].cnn_only]
        if cnn_only:
            raise ValueError(
                f"argument --variants: {cnn_only[0]} runs on the CNN only; got --model "
                f"{' '.join(models)}"
            )
    if BASELINE not in names:
        names = [BASELINE, *names]
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise ValueError(f"argument --jobs: must be >= 1; got {jobs}")
    if jobs is None:
        jobs = min(len(models), os.cpu_count() or 1)
    return {"cfg": cfg, "models": models, "variants": names, "jobs": jobs}


def output_files(models: Sequence[str], variants: Sequence[str], *, plot: bool = True) -> list[str]:
    """The files :func:`main` writes in its output folder for ``models`` and ``variants``:
    each model's partial results while it runs, then ``results.json`` and, with ``plot``,
    the figures. With no models and no variants: what :func:`write_merged` writes."""
    files = [f"results.partial.json.{mk}" for mk in models] + ["results.json"]
    if plot:
        files += ["accuracy.png", "curves.png"]
        if HEATMAP_VARIANT in variants:
            files += [f"inhib_{mk}.png" for mk in models]
    return files


def main(args) -> int:
    """``jax-batchinhib train --task mnist1d`` (or ``--task digits --study``). A bad
    setting raises ``ValueError`` (:func:`config_from_args`) before anything is written."""
    import resource

    task = args.task
    c = config_from_args(args)
    cfg, models, names, jobs = c["cfg"], c["models"], c["variants"], c["jobs"]

    def cpu_s():  # this process and its finished children (the --jobs workers)
        r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in r)

    t0, c0 = time.perf_counter(), cpu_s()
    os.makedirs(args.out, exist_ok=True)
    partial = os.path.join(args.out, "results.partial.json")
    study = run_study(
        task,
        models,
        names,
        cfg,
        quick=args.quick,
        quiet=args.quiet,
        partial_path=partial,
        jobs=jobs,
    )
    for mk in models:
        if os.path.exists(f"{partial}.{mk}"):
            os.remove(f"{partial}.{mk}")
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0
    study["config"] = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "models": list(models),
        "variants": list(names),
        "quick": bool(args.quick),
        "optimizer": "Adam (optax.scale_by_adam, default betas), constant learning rate",
        "validation": "25% of the training set (validation_split seed 0); lr chosen by the "
        "mean validation accuracy after the last step over val_seeds seeds",
        "ci": "95% Student-t interval of the per-seed difference (paired by seed: same "
        "initial kernels and batch order)",
        "published_mnist1d_test_acc_percent": PUBLISHED,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "wall_s": wall,
        "process_cpu_s": cpu,
        "jobs": jobs,
    }
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, "results.json")]
    heat = study.pop("_heatmap", {})
    study["table_markdown"] = format_tables(study)

    def dump():
        with open(written[0], "w") as f:
            json.dump(_jsonable(study), f, indent=1)

    dump()  # the numbers first: a plotting failure must not lose them
    if not args.no_plot:
        plot_accuracy(study, os.path.join(args.out, "accuracy.png"))
        plot_curves(study, os.path.join(args.out, "curves.png"))
        written += [os.path.join(args.out, p) for p in ("accuracy.png", "curves.png")]
        for mk, h in heat.items():
            study["models"][mk]["heatmap"] = {
                "variant": HEATMAP_VARIANT,
                "layer": "first BatchInhib (after the first BatchNorm), seed 0, test set",
                "mean_abs_offdiag_corr_in": h["mean_abs_offdiag_corr_in"],
                "mean_abs_offdiag_corr_out": h["mean_abs_offdiag_corr_out"],
            }
            p = os.path.join(args.out, f"inhib_{mk}.png")
            plot_heatmaps(
                h,
                f"{task} {mk.upper()} `{HEATMAP_VARIANT}`: first BatchInhib layer, seed 0, "
                "inference mode on the test set",
                p,
            )
            written.append(p)
        dump()
    table = study["table_markdown"]
    print()
    print(
        f"{task}: Adam, batch {cfg['batch_size']}, {cfg['steps']} steps, lr grid "
        f"{list(cfg['lrs'])} ({cfg['val_seeds']} seed(s) each, on the validation split), "
        f"then {cfg['seeds']} seeds; {jax.default_backend()}, {wall:.0f} s wall, "
        f"{cpu:.0f} s process CPU"
    )
    print(table)
    print("wrote " + ", ".join(written))
    return 0


# ------------------------------------------------------------------------ merging runs


#: the settings that runs must share to be merged
MERGE_KEYS = ("steps", "batch_size", "eval_every", "lrs", "seeds", "val_seeds", "quick")


def _agree(x, y) -> bool:
    """Two runs' accuracies (lists, or dicts of lists) agree to 1e-6 (the runs are
    deterministic)."""
    if isinstance(x, dict) or isinstance(y, dict):
        return (
            isinstance(x, dict)
            and isinstance(y, dict)
            and x.keys() == y.keys()
            and all(_agree(x[k], y[k]) for k in x)
        )
    return np.shape(x) == np.shape(y) and bool(np.all(np.abs(np.subtract(x, y)) <= 1e-6))


def merge(studies: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """One study from several runs of the same task and configuration (e.g. the variants
    split over several processes): each model's variants in the order of
    :data:`VARIANTS` (unknown names last, in order of appearance); a variant run twice
    must agree to 1e-6 on every seed (the runs are deterministic) and is kept once; the
    comparisons with our BatchNorm are recomputed. ``names``: the runs' names in the
    error messages (default ``run 0``, ``run 1``, ...)."""
    if not studies:
        raise ValueError("study.merge: nothing to merge")
    names = [f"run {i}" for i in range(len(studies))] if names is None else list(names)
    task = studies[0]["task"]
    cfg0 = {k: studies[0]["config"][k] for k in MERGE_KEYS}
    out = {"task": task, "models": {}, "config": dict(studies[0]["config"])}
    out["config"]["merged_from"] = []
    origin: dict[tuple[str, str], int] = {}
    for i, s in enumerate(studies):
        if s["task"] != task:
            raise ValueError(
                f"study.merge: {names[i]} is a {s['task']} study, {names[0]} a {task} one: "
                "merge runs of one task"
            )
        cfg = {k: s["config"][k] for k in MERGE_KEYS}
        if cfg != cfg0:
            diff = ", ".join(f"{k} {cfg[k]} vs {cfg0[k]}" for k in MERGE_KEYS if cfg[k] != cfg0[k])
            raise ValueError(
                f"study.merge: {names[i]} and {names[0]} ran with different settings ({diff}): "
                "merge runs of one configuration"
            )
        out["config"]["merged_from"].append(
            {k: s["config"][k] for k in ("variants", "models", "wall_s", "process_cpu_s")}
        )
        for mk, m in s["models"].items():
            tgt = out["models"].setdefault(mk, {**m, "variants": []})
            if "heatmap" in m:
                tgt["heatmap"] = m["heatmap"]
            have = {r["variant"]: r for r in tgt["variants"]}
            for r in m["variants"]:
                if r["variant"] in have:
                    old = have[r["variant"]]
                    j = origin[mk, r["variant"]]
                    for key in ("test_acc_per_seed", "test_acc_per_seed_per_lr"):
                        x, y = old.get(key), r.get(key)
                        if x is not None and y is not None and not _agree(x, y):
                            raise ValueError(
                                f"study.merge: {mk} {r['variant']} differs between "
                                f"{names[j]} and {names[i]} ({key})"
                            )
                    if "test_acc_per_seed_per_lr" in r and "test_acc_per_seed_per_lr" not in old:
                        tgt["variants"][tgt["variants"].index(old)] = r  # keep the fuller row
                        origin[mk, r["variant"]] = i
                    continue
                origin[mk, r["variant"]] = i
                tgt["variants"].append(r)
    for mk, m in out["models"].items():
        if not any(r["variant"] == BASELINE for r in m["variants"]):
            raise ValueError(
                f"study.merge: no run has the baseline {BASELINE} on the {mk}: every variant "
                f"is compared with it (a study run always trains it)"
            )
        try:
            compare_with_baseline(m["variants"])
        except ValueError as e:
            raise ValueError(f"study.merge: {mk} {e}") from None
        order = {name: i for i, name in enumerate(VARIANTS)}
        m["variants"].sort(key=lambda r: order.get(r["variant"], len(order)))
    runs = out["config"]["merged_from"]
    out["config"]["variants"] = list(dict.fromkeys(v for x in runs for v in x["variants"]))
    out["config"]["models"] = list(out["models"])
    out["config"]["wall_s"] = sum(x["wall_s"] for x in out["config"]["merged_from"])
    out["config"]["process_cpu_s"] = sum(x["process_cpu_s"] for x in out["config"]["merged_from"])
    out["table_markdown"] = format_tables(out)
    return out


#: what :func:`merge` and its tables and plots read of each model, and of each variant
MODEL_KEYS = {"n_train", "n_val", "n_test", "variants"}
VARIANT_KEYS = {"variant", "seeds", "lr", "val_acc", "test_acc_per_seed", "test_acc_mean"}
VARIANT_KEYS |= {"test_acc_std", "test_acc_ci95", "train_acc_mean", "curves"}


def _read_results(path: str) -> dict:
    """A study's ``results.json`` for :func:`merge_files`; ``ValueError`` naming ``path``
    when it cannot be read or is not one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"argument --merge: {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(
            f"argument --merge: {path} is a folder; expected its results.json"
        ) from None
    except OSError as e:
        raise ValueError(f"argument --merge: cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"argument --merge: {path} is not a JSON file ({e})") from None
    need = ("variants", "models", "wall_s", "process_cpu_s", *MERGE_KEYS)

    def is_model(m):
        if not (isinstance(m, dict) and MODEL_KEYS <= m.keys() and isinstance(m["variants"], list)):
            return False
        return bool(m["variants"]) and all(
            isinstance(r, dict) and VARIANT_KEYS <= r.keys() for r in m["variants"]
        )

    ok = (
        isinstance(d, dict)
        and d.get("task") in DEFAULTS
        and isinstance(d.get("models"), dict)
        and all(is_model(m) for m in d["models"].values())
        and isinstance(d.get("config"), dict)
        and all(k in d["config"] for k in need)
    )
    if not ok:
        raise ValueError(
            f"argument --merge: {path} is not the results.json of a study (jax-batchinhib "
            "train --task mnist1d, or --task digits --study)"
        )
    return d


def merge_files(paths: Sequence[str], task: str | None = None) -> dict:
    """:func:`merge` of the ``results.json`` files at ``paths``, all of study ``task``
    when given. Raises ``ValueError("argument --merge: ...")`` naming the file that is
    missing, unreadable, not a study's results, of another task or configuration, or
    disagrees with another; nothing is written."""
    studies = [_read_results(p) for p in paths]
    if task is not None:
        for p, s in zip(paths, studies, strict=True):
            if s["task"] != task:
                raise ValueError(
                    f"argument --merge: {p} is a --task {s['task']} study; expected --task "
                    f"{task} (the --task given)"
                )
    try:
        return merge(studies, names=list(paths))
    except ValueError as e:
        raise ValueError(f"argument --merge: {str(e).removeprefix('study.merge: ')}") from None


def write_merged(m: dict, out_dir: str, *, plot: bool = True) -> int:
    """Write a merged study ``m`` (:func:`merge`) into ``out_dir``: ``results.json`` and,
    with ``plot``, ``accuracy.png`` and ``curves.png``; print its tables and the files
    written. Returns 0."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "results.json")]
    with open(written[0], "w") as f:
        json.dump(m, f, indent=1)
    if plot:
        plot_accuracy(m, os.path.join(out_dir, "accuracy.png"))
        plot_curves(m, os.path.join(out_dir, "curves.png"))
        written += [os.path.join(out_dir, p) for p in ("accuracy.png", "curves.png")]
    print(m["table_markdown"])
    print("wrote " + ", ".join(written))
    return 0


def merge_main(paths: Sequence[str], out_dir: str, *, no_plot: bool = False) -> int:
    """Merge ``results.json`` files (see :func:`merge_files`) into ``out_dir``: its
    ``results.json`` and, unless ``no_plot``, ``accuracy.png`` and ``curves.png``."""
    return write_merged(merge_files(paths), out_dir, plot=not no_plot)
