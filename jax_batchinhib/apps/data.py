"""Data sets for the examples: scikit-learn's digits (and MNIST-1D, generated offline).

They need the ``examples`` extra (``pip install 'jax-batchinhib[examples]'``).
"""

from __future__ import annotations

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
