"""Data sets for the examples: scikit-learn's digits (and MNIST-1D, generated offline).

They need the ``examples`` extra (``pip install 'jax-batchinhib[examples]'``).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's digits, pixels / 16 in [0, 1], flattened to 64 features; a fixed
    stratified split. Returns ``(x_train, y_train, x_test, y_test)`` as numpy arrays."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - extra not installed
        raise ImportError(
            "train: scikit-learn is needed for the digits data: pip install "
            "'jax-batchinhib[examples]'"
        ) from e
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return xtr, ytr, xte, yte


class Split(NamedTuple):
    """A supervised split: ``x_train``, ``y_train`` (int32), ``x_test``, ``y_test``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    *,
    channels: bool = False,
    **overrides,
) -> Split:
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020), generated offline by the
    ``mnist1d`` package's generator with its default arguments: 10 classes of 1-D signals
    of length 40, ``num_samples`` in all, the first 80% for training (4,000 / 1,000 with
    the defaults). Nothing is downloaded.

    Args:
      num_samples: examples in all (a multiple of 10: the generator makes
        ``num_samples // 10`` per class).
      seed: the generator's seed (42 gives the published data set).
      channels: return ``x`` as ``(B, 40, 1)`` (channels last, for a 1-D CNN) instead of
        ``(B, 40)``.
      **overrides: other arguments of ``mnist1d.data.get_dataset_args`` (e.g.
        ``final_seq_length``).

    Returns:
      A :class:`Split` of numpy arrays: ``x`` float32, ``y`` int32 in ``0..9``.

    The generator seeds numpy's and Python's global random state; both are restored
    afterwards, so loading the data does not change the caller's random streams.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - extra not installed
        raise ImportError(
            "load_mnist1d: the mnist1d package is needed to generate MNIST-1D: pip install "
            "'jax-batchinhib[examples]'"
        ) from e
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(f"load_mnist1d: num_samples must be an int >= 20; got {num_samples!r}")
    if num_samples % 10:  # the generator would silently make fewer
        raise ValueError(
            "load_mnist1d: num_samples must be a multiple of 10 (the generator makes "
            f"num_samples // 10 examples of each class); got {num_samples}"
        )
    args = get_dataset_args()
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise ValueError(
            f"load_mnist1d: unknown generator arguments {unknown}; known: {sorted(vars(args))}"
        )
    args.num_samples = num_samples
    args.seed = seed
    for k, v in overrides.items():
        setattr(args, k, v)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    xtr, xte = (np.asarray(d[k], np.float32) for k in ("x", "x_test"))
    if channels:
        xtr, xte = xtr[..., None], xte[..., None]
    return Split(xtr, np.asarray(d["y"], np.int32), xte, np.asarray(d["y_test"], np.int32))


def validation_split(split: Split, fraction: float = 0.25, seed: int = 0) -> Split:
    """Carve a validation set out of ``split``'s training set (the test set is untouched):
    returns a :class:`Split` whose train part is the training set minus the validation
    rows and whose test part is the validation rows (``round(fraction * n)`` of them, chosen at
    random with ``seed``). Model choices (a learning rate) are made on it, never on the
    test set."""
    x, y = split.x_train, split.y_train
    keep, val = validation_rows(len(y), fraction, seed)
    return Split(x[keep], y[keep], x[val], y[val])


def validation_rows(n: int, fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The row indices :func:`validation_split` keeps for training and carves out for
    validation, both sorted, out of ``n`` training rows."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split: fraction must be in (0, 1); got {fraction!r}")
    n_val = int(round(fraction * n))
    if not 0 < n_val < n:
        raise ValueError(
            f"validation_split: fraction={fraction} of {n} training rows leaves no "
            "validation or no training rows"
        )
    val = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
    return np.setdiff1d(np.arange(n), val), val
