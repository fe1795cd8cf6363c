"""MNIST-1D: the offline loader (real generator, small num_samples), the 1-D models, the
study's statistics, and ``train --task mnist1d --quick`` end to end (JSON and PNGs)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib.apps import cli, study
from jax_batchinhib.apps.data import load_mnist1d, validation_split
from jax_batchinhib.apps.models import InhibOptions, Mnist1dCNN, Mnist1dMLP, parse_chain


@pytest.fixture(scope="module")
def small():
    return load_mnist1d(num_samples=200)


def test_mnist1d_loader_shapes_dtypes_classes(small):
    xtr, ytr, xte, yte = small
    assert xtr.shape == (160, 40) and xte.shape == (40, 40)  # 80/20 split, length 40
    assert xtr.dtype == xte.dtype == np.float32
    assert ytr.dtype == yte.dtype == np.int32
    assert set(np.unique(np.concatenate([ytr, yte]))) == set(range(10))
    # the generator makes num_samples // 10 examples of each class
    np.testing.assert_array_equal(np.bincount(np.concatenate([ytr, yte])), np.full(10, 20))
    c = load_mnist1d(num_samples=200, channels=True)
    assert c.x_train.shape == (160, 40, 1)
    np.testing.assert_array_equal(c.x_train[..., 0], xtr)


def test_mnist1d_loader_is_deterministic_and_leaves_global_rng_alone(small):
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    again = load_mnist1d(num_samples=200)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    for a, b in zip(small, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = load_mnist1d(num_samples=200, seed=0)
    assert not np.array_equal(other.x_train, small.x_train)


def test_validation_split_carves_the_training_set_only(small):
    v = validation_split(small, 0.25, seed=0)
    assert v.x_train.shape == (120, 40) and v.x_test.shape == (40, 40)
    rows = {r.tobytes() for r in np.concatenate([v.x_train, v.x_test])}
    assert rows == {r.tobytes() for r in small.x_train}  # a partition of the train set
    assert not rows & {r.tobytes() for r in small.x_test}  # the test set is untouched
    with pytest.raises(ValueError, match="fraction must be in"):
        validation_split(small, 1.0)


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be an int >= 20"):
        load_mnist1d(num_samples=5)
    with pytest.raises(ValueError, match="unknown generator arguments"):
        load_mnist1d(num_samples=100, nonsense=1)


def test_models_match_the_mnist1d_repository_sizes():
    """15,210 and 5,210 parameters without normalization, as in the original models."""
    x = jnp.ones((4, 40, 1))

    def count(m):
        v = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))

    assert count(Mnist1dMLP()) == 15_210
    assert count(Mnist1dCNN()) == 5_210
    assert parse_chain("t", "none") == ("relu",)
    assert parse_chain("t", "batchnorm+relu+inhib") == ("batchnorm", "relu", "inhib")
    with pytest.raises(ValueError, match="unknown"):
        parse_chain("t", "batchnorm+dropout")
    m = Mnist1dCNN(norm="inhib+batchnorm", inhib=InhibOptions(groups=5, alpha_init=0.0))
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False))
    assert v["params"]["norm0"]["inhib0"]["alpha"].shape == (5, 5, 5)
    # a BatchNorm follows (BatchInhib is linear in x): the conv's bias would be redundant
    assert "bias" not in v["params"]["conv0"]
    v = jax.eval_shape(lambda: Mnist1dMLP(norm="inhib").init(jax.random.key(0), x, train=False))
    assert "bias" in v["params"]["dense0"]


@pytest.mark.parametrize("k,use_bias", [(5, True), (3, False)])
def test_strided_conv_equals_flax_conv(k, use_bias):
    """StridedConv1d (patches @ kernel) has nn.Conv's parameters, initial values and
    output: the same init key gives identical kernels, and the outputs agree to float32
    round-off of a k*C-term dot product (measured 4.8e-7; bound 2e-6), with a bias, on
    several channels, under vmap over parameters."""
    from jax_batchinhib.apps.models import StridedConv1d

    x = jax.random.normal(jax.random.key(0), (6, 19, 3))
    ours = StridedConv1d(4, k, stride=2, padding=1, use_bias=use_bias)
    flax = nn.Conv(4, (k,), strides=(2,), padding=((1, 1),), use_bias=use_bias)
    keys = jax.random.split(jax.random.key(1), 3)
    p_ours = jax.vmap(lambda kk: ours.init(kk, x))(keys)
    p_flax = jax.vmap(lambda kk: flax.init(kk, x))(keys)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_flax)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_flax), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p_ours)
    y_ours = jax.vmap(lambda q: ours.apply(q, x))(p)
    y_flax = jax.vmap(lambda q: flax.apply(q, x))(p)
    assert y_ours.shape == y_flax.shape == (3, 6, (19 + 2 - k) // 2 + 1, 4)
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_flax), atol=2e-6, rtol=0)


def test_paired_difference_verdicts():
    base = [0.60, 0.62, 0.64, 0.66, 0.68]
    up = [b + 0.02 + 0.001 * i for i, b in enumerate(base)]
    assert study.paired_difference(up, base)["verdict"] == "helps"
    assert study.paired_difference(base, up)["verdict"] == "hurts"
    noisy = [b + d for b, d in zip(base, [0.02, -0.02, 0.01, -0.01, 0.0], strict=True)]
    r = study.paired_difference(noisy, base)
    assert r["verdict"] == "ties" and r["ci_low"] < 0 < r["ci_high"]
    assert study.t975(4) == pytest.approx(2.776)
    assert study.t975(22) == pytest.approx(2.086)  # next smaller tabulated df: wider


def test_train_mnist1d_quick_writes_json_and_pngs(tmp_path):
    out = tmp_path / "study"
    # --jobs 2: the two models in two processes, their results merged
    argv = ["train", "--task", "mnist1d", "--quick", "--quiet", "--jobs", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    d = json.loads((out / "results.json").read_text())
    cfg = d["config"]
    assert cfg["quick"] and len(cfg["lrs"]) >= 4 and cfg["jobs"] == 2
    for mk in ("mlp", "cnn"):
        m = d["models"][mk]
        names = [r["variant"] for r in m["variants"]]
        assert names == list(study.QUICK_VARIANTS)
        for r in m["variants"]:
            # the learning rate was chosen on the validation split, recorded with its score
            assert r["lr"] in cfg["lrs"] and len(r["val_acc_per_lr"]) == len(cfg["lrs"])
            assert r["val_acc"] == pytest.approx(max(r["val_acc_per_lr"]))
            assert len(r["test_acc_per_seed"]) == cfg["seeds"]
            assert all(0.0 <= a <= 1.0 for a in r["test_acc_per_seed"] + r["train_acc_per_seed"])
            if r["variant"] != "bn":
                c = r["vs_bn"]
                assert c["ci_low"] <= c["diff"] <= c["ci_high"]
        assert m["heatmap"]["variant"] == study.HEATMAP_VARIANT
    for png in ("accuracy.png", "curves.png", "inhib_mlp.png", "inhib_cnn.png"):
        b = (out / png).read_bytes()
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 10_000, png
    assert "| `bn+bi_abs_abs_a0` |" in d["table_markdown"]


def test_results_doc_matches_the_committed_runs():
    """docs/results.md's tables are the committed runs' tables (docs/results/*.json,
    re-rendered by the study's own formatter), and its verdict paragraph's claims hold in
    them: the modules keep their near-identity defaults because no BatchInhib
    configuration helps on both MNIST-1D models."""
    import re
    from pathlib import Path

    from jax_batchinhib import linen as bnn

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "results.md").read_text()
    runs = {}
    for task in ("mnist1d", "digits"):
        d = json.loads((docs / "results" / f"{task}_results.json").read_text())
        block = re.search(rf"<!-- BEGIN {task}-tables -->\n(.*?)<!-- END", text, re.S).group(1)
        assert block == study.format_tables(d)
        runs[task] = {
            mk: {r["variant"]: r.get("vs_bn", {}).get("verdict", "baseline") for r in m["variants"]}
            for mk, m in d["models"].items()
        }
    assert runs["mnist1d"]["mlp"]["bn+bi_abs_abs_a0_rho4"] == "helps"
    assert runs["mnist1d"]["cnn"]["bn+bi_abs_abs_a0_rho4"] == "ties"
    assert runs["mnist1d"]["cnn"]["bi+bn_abs_abs_a0"] == "hurts"
    helps_both = [
        v
        for v, w in runs["mnist1d"]["mlp"].items()
        if w == "helps" and runs["mnist1d"]["cnn"].get(v) == "helps"
    ]
    assert helps_both == []
    assert runs["mnist1d"]["mlp"]["zca"] == "hurts"
    assert {runs[t][mk]["iternorm"] for t in runs for mk in runs[t]} == {"ties"}
    layer = bnn.BatchInhib()
    assert (layer.denominator, layer.guard_mode) == ("signed", "absolute")
    assert layer.alpha_init is None  # None: near_identity_alpha_init
