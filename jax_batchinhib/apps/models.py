"""Example models built from the library's layers (linen, and NNX twins).

- :class:`MLP`: Dense -> norm -> ReLU (-> Dropout) blocks, then a Dense head.
  The Dense (Conv in :class:`CNN`) before a BatchNorm has no bias (``use_bias=False``,
  see :func:`layer_bias`): BatchNorm's own bias takes its place.
- :class:`CNN`: a small NHWC CNN (Conv 3x3 -> norm -> ReLU, average pooling), e.g. for
  8x8 digits ``(B, 8, 8, 1)``.
- :class:`TwoBranch`: the two-branch block of docs/derivations.md, section 6. Branch A:
  Dense -> sin -> Dropout -> Dense; branch B: Dense (no bias) -> BatchCenter -> ReLU;
  concat([B, A]) -> Dense -> logits (the softmax is in the loss,
  :func:`jax_batchinhib.softmax_cross_entropy`).

The normalization of MLP and CNN is chosen by one string, ``norm`` (see :data:`NORMS`):

=================== ==========================================================
``"none"``          no normalization
``"flax_batchnorm"`` :class:`flax.linen.BatchNorm` (:class:`flax.nnx.BatchNorm`)
``"batchnorm"``     our :class:`jax_batchinhib.linen.BatchNorm`
``"batchnorm+inhib"`` our BatchNorm followed by our BatchInhib
``"inhib"``         our BatchInhib alone (``inhib_groups`` groups)
=================== ==========================================================

All models take ``__call__(x, *, train)``: ``train=True`` uses batch statistics and
updates ``batch_stats`` (apply with ``mutable=["batch_stats"]``) and draws dropout masks
from the ``'dropout'`` rng collection; ``train=False`` uses the running statistics.
``use_autodiff=True`` switches every layer of ours to autodiff of the reference.

The NNX twins :class:`NnxMLP`, :class:`NnxCNN` and :class:`NnxTwoBranch` take the input
size first and ``rngs``; they are called as ``model(x)`` in the mode set by
``model.train()`` / ``model.eval()`` (or ``nnx.view``), with the same submodule names
and the same parameters as the linen models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from jax_batchinhib import linen as bl
from jax_batchinhib import nnx as bx

NORMS = ("none", "flax_batchnorm", "batchnorm", "batchnorm+inhib", "inhib")


# Normalizations that end with a learned bias (BatchNorm: ``y = scale * xhat + bias``).
# The Dense/Conv before one of them gets no bias (as in flax's examples): the
# normalization subtracts the batch mean, so a bias there has an exactly zero gradient
# and adds nothing, except that Adam scales round-off in that zero gradient up to
# full-size steps (which made otherwise equal multi-device runs drift apart).
NORMS_WITH_BIAS = ("flax_batchnorm", "batchnorm", "batchnorm+inhib")


def layer_bias(norm: str) -> bool:
    """``use_bias`` of the Dense/Conv that feeds ``norm``: False when a normalization
    with a bias follows (the layer's bias would be redundant), True otherwise."""
    return norm not in NORMS_WITH_BIAS


def check_norm(where: str, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be one of {NORMS}; got {norm!r}")


def _flax_momentum(where: str, momentum, norm: str = "flax_batchnorm") -> float:
    """flax's BatchNorm keeps an EMA only: it needs a float momentum. ``norm``: the
    normalization (or chain) that has the flax step, for the message."""
    if momentum is None:
        ours = "norm='batchnorm'" if norm == "flax_batchnorm" else "the 'batchnorm' step"
        raise ValueError(
            f"{where}: norm={norm!r} needs a float momentum (flax's BatchNorm has no "
            f"cumulative average); got momentum=None. Pass a float such as 0.99, or use "
            f"{ours} (ours keeps the cumulative average with momentum=None)."
        )
    return momentum


def check_dropout_rate(where: str, rate) -> None:
    """A dropout rate must be in [0, 1] (0: no Dropout layer); a negative one would
    silently disable dropout."""
    try:
        ok = not isinstance(rate, bool) and 0.0 <= float(rate) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: dropout_rate must be a float in [0, 1]; got {rate!r}")


def norm_layers(
    norm: str,
    *,
    index: int,
    train: bool,
    momentum: float | None = 0.9,
    unbiased: bool = True,
    inhib_groups: int = 1,
    use_autodiff: bool = False,
) -> list[nn.Module]:
    """The linen normalization layers named by ``norm``, in the order they apply.

    The one place where the variants are defined, so a training script can sweep them.
    Layer names: ``bn{index}`` for BatchNorm (ours or flax's), ``inhib{index}`` for
    BatchInhib.
    """
    check_norm("models.norm_layers", norm)
    ura = not train
    layers: list[nn.Module] = []
    if norm == "flax_batchnorm":
        layers.append(
            nn.BatchNorm(
                use_running_average=ura,
                momentum=_flax_momentum("models.norm_layers", momentum),
                use_fast_variance=False,
                name=f"bn{index}",
            )
        )
    if norm in ("batchnorm", "batchnorm+inhib"):
        layers.append(
            bl.BatchNorm(
                use_running_average=ura,
                momentum=momentum,
                unbiased=unbiased,
                use_autodiff=use_autodiff,
                name=f"bn{index}",
            )
        )
    if norm in ("inhib", "batchnorm+inhib"):
        layers.append(
            bl.BatchInhib(
                use_running_average=ura,
                momentum=momentum,
                unbiased=unbiased,
                groups=inhib_groups,
                use_autodiff=use_autodiff,
                name=f"inhib{index}",
            )
        )
    return layers


class MLP(nn.Module):
    """Dense -> norm -> ReLU (-> Dropout) for each width in ``features``, then
    ``Dense(num_classes)`` (``head``). Dense layers are ``dense{i}``."""

    features: Sequence[int] = (64, 64)
    num_classes: int = 10
    norm: str = "batchnorm"
    inhib_groups: int = 1
    dropout_rate: float = 0.0
    momentum: float | None = 0.9
    unbiased: bool = True
    use_autodiff: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_norm("MLP", self.norm)
        check_dropout_rate("MLP", self.dropout_rate)
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.features):
            x = nn.Dense(f, use_bias=layer_bias(self.norm), name=f"dense{i}")(x)
            for layer in norm_layers(
                self.norm,
                index=i,
                train=train,
                momentum=self.momentum,
                unbiased=self.unbiased,
                inhib_groups=self.inhib_groups,
                use_autodiff=self.use_autodiff,
            ):
                x = layer(x)
            x = nn.relu(x)
            if self.dropout_rate > 0:
                x = bl.Dropout(
                    self.dropout_rate,
                    deterministic=not train,
                    use_autodiff=self.use_autodiff,
                    name=f"dropout{i}",
                )(x)
        return nn.Dense(self.num_classes, name="head")(x)


class CNN(nn.Module):
    """A small NHWC CNN: for each width in ``features``, Conv 3x3 (``conv{i}``) -> norm
    -> ReLU -> 2x2 average pooling (while the image is larger than 2x2); then global
    average pooling, optional Dropout and ``Dense(num_classes)`` (``head``).
    Input ``(B, H, W, C)``, e.g. digits ``(B, 8, 8, 1)``."""

    features: Sequence[int] = (16, 32)
    num_classes: int = 10
    norm: str = "batchnorm"
    inhib_groups: int = 1
    dropout_rate: float = 0.0
    momentum: float | None = 0.9
    unbiased: bool = True
    use_autodiff: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        check_norm("CNN", self.norm)
        check_dropout_rate("CNN", self.dropout_rate)
        if x.ndim != 4:
            raise ValueError(
                f"CNN: x must be NHWC (B, H, W, C), e.g. (B, 8, 8, 1); got shape {x.shape}"
            )
        for i, f in enumerate(self.features):
            x = nn.Conv(f, (3, 3), padding="SAME", use_bias=layer_bias(self.norm), name=f"conv{i}")(
                x
            )
            for layer in norm_layers(
                self.norm,
                index=i,
                train=train,
                momentum=self.momentum,
                unbiased=self.unbiased,
                inhib_groups=self.inhib_groups,
                use_autodiff=self.use_autodiff,
            ):
                x = layer(x)
            x = nn.relu(x)
            if x.shape[1] > 2 and x.shape[2] > 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout_rate > 0:
            x = bl.Dropout(
                self.dropout_rate,
                deterministic=not train,
                use_autodiff=self.use_autodiff,
                name="dropout",
            )(x)
        return nn.Dense(self.num_classes, name="head")(x)


class TwoBranch(nn.Module):
    """The two-branch block of docs/derivations.md, section 6.

    Branch A: ``z1a = sin(fc1a(x))``, dropout (``dropout``), ``yA = fc2a(.)``.
    Branch B: ``x1B = fc1b(x)`` (no bias), ``xBN = center(x1B)`` (BatchCenter: param
    ``bias``, batch_stats ``mean``), ``relu``. Head: ``logits = fc2b(concat([relu(xBN),
    yA], -1))``. Returns logits ``(B, num_classes)``; the softmax is in the loss.
    """

    features_a: int = 32
    features_b: int = 32
    num_classes: int = 10
    dropout_rate: float = 0.2
    use_autodiff: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        z1a = jnp.sin(nn.Dense(self.features_a, name="fc1a")(x))
        z1a = bl.Dropout(
            self.dropout_rate,
            deterministic=not train,
            use_autodiff=self.use_autodiff,
            name="dropout",
        )(z1a)
        ya = nn.Dense(self.features_a, name="fc2a")(z1a)
        x1b = nn.Dense(self.features_b, use_bias=False, name="fc1b")(x)
        xbn = bl.BatchCenter(
            use_running_average=not train, use_autodiff=self.use_autodiff, name="center"
        )(x1b)
        zbn = jnp.concatenate([nn.relu(xbn), ya], axis=-1)
        return nn.Dense(self.num_classes, name="fc2b")(zbn)


# =================================================================================== NNX


def nnx_norm_layers(
    norm: str,
    num_features: int,
    *,
    momentum: float | None = 0.9,
    unbiased: bool = True,
    inhib_groups: int = 1,
    use_autodiff: bool = False,
    rngs: nnx.Rngs,
) -> nnx.List:
    """The NNX normalization layers named by ``norm`` (see :func:`norm_layers`)."""
    check_norm("models.nnx_norm_layers", norm)
    layers = []
    if norm == "flax_batchnorm":
        layers.append(
            nnx.BatchNorm(
                num_features,
                momentum=_flax_momentum("models.nnx_norm_layers", momentum),
                use_fast_variance=False,
                rngs=rngs,
            )
        )
    if norm in ("batchnorm", "batchnorm+inhib"):
        layers.append(
            bx.BatchNorm(
                num_features,
                momentum=momentum,
                unbiased=unbiased,
                use_autodiff=use_autodiff,
                rngs=rngs,
            )
        )
    if norm in ("inhib", "batchnorm+inhib"):
        layers.append(
            bx.BatchInhib(
                num_features,
                momentum=momentum,
                unbiased=unbiased,
                groups=inhib_groups,
                use_autodiff=use_autodiff,
                rngs=rngs,
            )
        )
    return nnx.List(layers)


class NnxMLP(nnx.Module):
    """NNX twin of :class:`MLP`: ``dense[i]`` -> ``norms[i]`` -> ReLU (-> ``dropouts[i]``),
    then ``head``."""

    def __init__(
        self,
        in_features: int,
        features: Sequence[int] = (64, 64),
        num_classes: int = 10,
        *,
        norm: str = "batchnorm",
        inhib_groups: int = 1,
        dropout_rate: float = 0.0,
        momentum: float | None = 0.9,
        unbiased: bool = True,
        use_autodiff: bool = False,
        rngs: nnx.Rngs,
    ):
        check_norm("NnxMLP", norm)
        check_dropout_rate("NnxMLP", dropout_rate)
        dense, norms, drops = [], [], []
        d = in_features
        for f in features:
            dense.append(nnx.Linear(d, f, use_bias=layer_bias(norm), rngs=rngs))
            norms.append(
                nnx_norm_layers(
                    norm,
                    f,
                    momentum=momentum,
                    unbiased=unbiased,
                    inhib_groups=inhib_groups,
                    use_autodiff=use_autodiff,
                    rngs=rngs,
                )
            )
            drops.append(
                bx.Dropout(dropout_rate, use_autodiff=use_autodiff, rngs=rngs)
                if dropout_rate > 0
                else None
            )
            d = f
        self.dense = nnx.List(dense)
        self.norms = nnx.List(norms)
        self.dropouts = nnx.List(drops)
        self.head = nnx.Linear(d, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for dense, norms, drop in zip(self.dense, self.norms, self.dropouts, strict=True):
            x = dense(x)
            for layer in norms:
                x = layer(x)
            x = nnx.relu(x)
            if drop is not None:
                x = drop(x)
        return self.head(x)


class NnxCNN(nnx.Module):
    """NNX twin of :class:`CNN` (NHWC input with ``in_channels`` channels)."""

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32),
        num_classes: int = 10,
        *,
        norm: str = "batchnorm",
        inhib_groups: int = 1,
        dropout_rate: float = 0.0,
        momentum: float | None = 0.9,
        unbiased: bool = True,
        use_autodiff: bool = False,
        rngs: nnx.Rngs,
    ):
        check_norm("NnxCNN", norm)
        check_dropout_rate("NnxCNN", dropout_rate)
        convs, norms = [], []
        c = in_channels
        for f in features:
            convs.append(
                nnx.Conv(c, f, (3, 3), padding="SAME", use_bias=layer_bias(norm), rngs=rngs)
            )
            norms.append(
                nnx_norm_layers(
                    norm,
                    f,
                    momentum=momentum,
                    unbiased=unbiased,
                    inhib_groups=inhib_groups,
                    use_autodiff=use_autodiff,
                    rngs=rngs,
                )
            )
            c = f
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.dropout = (
            bx.Dropout(dropout_rate, use_autodiff=use_autodiff, rngs=rngs)
            if dropout_rate > 0
            else None
        )
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"NnxCNN: x must be NHWC (B, H, W, C); got shape {x.shape}")
        for conv, norms in zip(self.convs, self.norms, strict=True):
            x = conv(x)
            for layer in norms:
                x = layer(x)
            x = nnx.relu(x)
            if x.shape[1] > 2 and x.shape[2] > 2:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.head(x)


class NnxTwoBranch(nnx.Module):
    """NNX twin of :class:`TwoBranch`: the same submodules ``fc1a``, ``dropout``,
    ``fc2a``, ``fc1b``, ``center``, ``fc2b``."""

    def __init__(
        self,
        in_features: int,
        features_a: int = 32,
        features_b: int = 32,
        num_classes: int = 10,
        *,
        dropout_rate: float = 0.2,
        use_autodiff: bool = False,
        rngs: nnx.Rngs,
    ):
        self.fc1a = nnx.Linear(in_features, features_a, rngs=rngs)
        self.dropout = bx.Dropout(dropout_rate, use_autodiff=use_autodiff, rngs=rngs)
        self.fc2a = nnx.Linear(features_a, features_a, rngs=rngs)
        self.fc1b = nnx.Linear(in_features, features_b, use_bias=False, rngs=rngs)
        self.center = bx.BatchCenter(features_b, use_autodiff=use_autodiff, rngs=rngs)
        self.fc2b = nnx.Linear(features_b + features_a, num_classes, rngs=rngs)

    def __call__(self, x):
        ya = self.fc2a(self.dropout(jnp.sin(self.fc1a(x))))
        xbn = self.center(self.fc1b(x))
        return self.fc2b(jnp.concatenate([nnx.relu(xbn), ya], axis=-1))


# ============================================================ MNIST-1D models (linen)
#
# The two baselines of the MNIST-1D repository (Greydanus, "Scaling down deep learning",
# 2020), channels last, with a normalization chain between each linear map and its
# activation. A chain is a "+"-separated string of steps applied in order:
#
#   "batchnorm"        our BatchNorm                 "flax_batchnorm"  flax's BatchNorm
#   "inhib"            our BatchInhib (options: :class:`InhibOptions`)
#   "iternorm"         our IterNorm (5 Newton steps)  "zca"      our ZCANorm (decorrelated BN)
#   "relu"             the block's activation (appended at the end when absent)
#
# The whitening steps split the features into ``whiten_groups`` contiguous groups (the
# model's attribute): a group wider than the layer's fan-in has a singular covariance.
#
# e.g. "none" (just the ReLU), "batchnorm+inhib" (BatchInhib after BatchNorm, before the
# ReLU), "inhib+batchnorm" (before BatchNorm), "batchnorm+relu+inhib" (after the ReLU).

CHAIN_STEPS = ("batchnorm", "flax_batchnorm", "inhib", "iternorm", "zca", "relu")
#: the chain steps that centre their input (the layer before them needs no bias)
CENTRING_STEPS = ("batchnorm", "flax_batchnorm", "iternorm", "zca")


@dataclasses.dataclass(frozen=True)
class InhibOptions:
    """The BatchInhib options a study sweeps (see :class:`jax_batchinhib.linen.BatchInhib`).

    ``alpha_init``: a constant for every ``alpha`` (0.0: full-strength inhibition from the
    first step), or None for the module's default
    (:func:`jax_batchinhib.linen.near_identity_alpha_init`).
    ``guard``: None for the module's default of the ``guard_mode``."""

    denominator: str = "signed"
    guard_mode: str = "absolute"
    alpha_init: float | None = None
    rho: float = 1.0
    groups: int = 1
    guard: float | None = None

    def structural(self) -> InhibOptions:
        """The same options without ``alpha_init``: what the training program depends on
        (``alpha_init`` only changes the initial parameters)."""
        return dataclasses.replace(self, alpha_init=None)


def parse_chain(where: str, norm: str) -> tuple[str, ...]:
    """``norm`` as a tuple of steps, ending with the activation ("relu" appended if absent)."""
    if not isinstance(norm, str) or not norm:
        raise ValueError(f"{where}: norm must be a non-empty string; got {norm!r}")
    steps = () if norm == "none" else tuple(norm.split("+"))
    bad = [s for s in steps if s not in CHAIN_STEPS]
    if bad:
        raise ValueError(
            f"{where}: norm must be 'none' or '+'-separated steps among {CHAIN_STEPS}; "
            f"got {norm!r} (unknown {bad})"
        )
    if steps.count("relu") > 1:
        raise ValueError(f"{where}: norm may name 'relu' at most once; got {norm!r}")
    return steps if "relu" in steps else steps + ("relu",)


def chain_bias(steps: Sequence[str]) -> bool:
    """``use_bias`` of the layer feeding ``steps``: False when a BatchNorm comes before
    anything else that is not a BatchInhib (its bias would have an exactly zero gradient);
    the whitening steps centre as BatchNorm does."""
    for s in steps:
        if s in CENTRING_STEPS:
            return False
        if s != "inhib":
            return True
    return True


class NormChain(nn.Module):
    """Applies a parsed ``norm`` chain (see :func:`parse_chain`). Layers are named
    ``bn{index}``, ``inhib{index}``, ``white{index}``; with ``sow=True`` the input and output of the
    BatchInhib are sown into the ``intermediates`` collection (``inhib_in``,
    ``inhib_out``) for plots."""

    steps: tuple
    index: int
    inhib: InhibOptions = InhibOptions()
    momentum: float | None = 0.9
    whiten_groups: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        ura = not train
        for s in self.steps:
            if s == "relu":
                x = nn.relu(x)
            elif s == "batchnorm":
                x = bl.BatchNorm(
                    use_running_average=ura, momentum=self.momentum, name=f"bn{self.index}"
                )(x)
            elif s == "flax_batchnorm":
                x = nn.BatchNorm(
                    use_running_average=ura,
                    momentum=_flax_momentum(
                        "models.NormChain", self.momentum, "+".join(self.steps)
                    ),
                    use_fast_variance=False,
                    name=f"bn{self.index}",
                )(x)
            elif s in ("iternorm", "zca"):
                layer = bl.IterNorm if s == "iternorm" else bl.ZCANorm
                x = layer(
                    use_running_average=ura,
                    momentum=self.momentum,
                    groups=self.whiten_groups,
                    name=f"white{self.index}",
                )(x)
            else:  # inhib
                o = self.inhib
                self.sow("intermediates", f"inhib_in{self.index}", x)
                x = bl.BatchInhib(
                    use_running_average=ura,
                    momentum=self.momentum,
                    rho=o.rho,
                    groups=o.groups,
                    denominator=o.denominator,
                    guard_mode=o.guard_mode,
                    guard=o.guard,
                    alpha_init=None
                    if o.alpha_init is None
                    else nn.initializers.constant(o.alpha_init),
                    name=f"inhib{self.index}",
                )(x)
                self.sow("intermediates", f"inhib_out{self.index}", x)
        return x


class Mnist1dMLP(nn.Module):
    """The MNIST-1D repository's MLP: ``h = act(dense0(x))``, ``h = h + act(dense1(h))``
    (a residual second layer, as in the original), ``head(h)``; 40-100-100-10 by default
    (15,210 parameters without normalization). ``act`` is the ``norm`` chain ending in a
    ReLU. ``residual=False`` gives a plain MLP (e.g. 64-64 on digits). ``whiten_groups``:
    the groups of an IterNorm/ZCA step (4 groups of 25 features: a group no wider than
    the first layer's 40 inputs, so its covariance is not singular)."""

    features: Sequence[int] = (100, 100)
    num_classes: int = 10
    norm: str = "none"
    inhib: InhibOptions = InhibOptions()
    residual: bool = True
    momentum: float | None = 0.9
    whiten_groups: int = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        steps = parse_chain("Mnist1dMLP", self.norm)
        if "flax_batchnorm" in steps:
            _flax_momentum("Mnist1dMLP", self.momentum, self.norm)
        x = x.reshape(x.shape[0], -1)
        for i, f in enumerate(self.features):
            h = nn.Dense(f, use_bias=chain_bias(steps), name=f"dense{i}")(x)
            h = NormChain(steps, i, self.inhib, self.momentum, self.whiten_groups, name=f"norm{i}")(
                h, train=train
            )
            x = x + h if self.residual and i > 0 and x.shape[-1] == f else h
        return nn.Dense(self.num_classes, name="head")(x)


class StridedConv1d(nn.Module):
    """A 1-D convolution, channels last, as patches times a matrix: the same parameters
    (``kernel`` ``(k, C, F)``, ``bias`` ``(F,)``), initialisation and output as
    ``nn.Conv(features, (k,), strides=(stride,), padding=((pad, pad),))``, but a plain
    matmul, which stays one batched matmul under ``jax.vmap`` over parameters (a
    vmapped ``nn.Conv`` becomes a grouped convolution: 4.5x slower on XLA:CPU for the
    MNIST-1D CNN; ``tests/test_study.py::test_strided_conv_equals_flax_conv``)."""

    features: int
    kernel_size: int
    stride: int = 2
    padding: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        k, s, c = self.kernel_size, self.stride, x.shape[-1]
        w = self.param("kernel", self.kernel_init, (k, c, self.features))
        xp = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
        n_out = (xp.shape[1] - k) // s + 1
        patches = jnp.stack([xp[:, t : t + s * (n_out - 1) + 1 : s, :] for t in range(k)], 2)
        y = patches.reshape(x.shape[0], n_out, k * c) @ w.reshape(k * c, self.features)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


class Mnist1dCNN(nn.Module):
    """The MNIST-1D repository's small 1-D CNN, channels last: three convolutions of
    ``channels`` (25) channels, kernel 5 then 3 and 3, stride 2, padding 1 (length
    40 -> 19 -> 10 -> 5), each followed by the ``norm`` chain (ending in a ReLU); flatten
    (5 x 25 = 125) and a Dense head: 5,210 parameters without normalization. Input
    ``(B, L, 1)`` (or ``(B, L)``, given a channel axis). ``whiten_groups``: the groups of an
    IterNorm/ZCA step (5 groups of 5 channels: the first convolution sees 5 inputs per
    position, so a wider group's covariance is singular)."""

    channels: int = 25
    num_classes: int = 10
    norm: str = "none"
    inhib: InhibOptions = InhibOptions()
    momentum: float | None = 0.9
    whiten_groups: int = 5

    @nn.compact
    def __call__(self, x, *, train: bool):
        steps = parse_chain("Mnist1dCNN", self.norm)
        if "flax_batchnorm" in steps:
            _flax_momentum("Mnist1dCNN", self.momentum, self.norm)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"Mnist1dCNN: x must be (B, L, 1) or (B, L); got shape {x.shape}")
        for i, k in enumerate((5, 3, 3)):
            x = StridedConv1d(
                self.channels, k, stride=2, padding=1, use_bias=chain_bias(steps), name=f"conv{i}"
            )(x)
            x = NormChain(steps, i, self.inhib, self.momentum, self.whiten_groups, name=f"norm{i}")(
                x, train=train
            )
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))
