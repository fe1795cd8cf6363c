"""Speed and memory of the hand-derived VJPs against autodiff of the reference and flax.

Every case times a jitted forward+backward step of several *contenders* in one run,
interleaved: ``ours`` (the op with its hand-derived ``custom_vjp``), ``autodiff``
(``jax.value_and_grad`` through :mod:`jax_batchinhib.reference`) and, where one exists,
the ecosystem's layer (``flax`` = ``flax.linen.BatchNorm`` / ``flax.linen.Dropout``,
``optax`` = ``optax.softmax_cross_entropy``). A step is::

    (loss, y), grads = value_and_grad(lambda *p: (sum(f(*p) * ct), f(*p)), has_aux)(...)

with a fixed random cotangent ``ct`` passed as an argument (so XLA cannot fold it), and
``y`` returned so that every contender writes its output, as a layer does. After a
warm-up, each of ``repeats`` rounds times every contender once, in a rotated order; one
timing is ``inner`` calls, each blocked on (CPU) or all blocked on at the end (GPU/TPU,
where executions run in stream order). The headline is the ratio of medians
``ours / theirs``.

Memory, per contender: ``resid_bytes``, the bytes of the residuals the backward keeps
(the unique array leaves of the function :func:`jax.vjp` returns, inputs included when
they are kept), and ``temp_bytes``, XLA's temporary buffer size of the compiled step
(``jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``).

Hardware limits, timed in the same rounds as extra contenders: ``copy`` (``x + 1`` and
``ct + 1``: reads and writes the same bytes a batch_norm step must move at least,
``read x, dy; write y, dx``) for the GB/s of batch_norm, and ``matmul`` (one
``(M, n) @ (n, n)`` per group at full float32 precision) for the GFLOP/s of batch_inhib,
whose step does five such matmuls (forward: covariance, ``x Rᵀ``; backward: ``dy R``,
``dyᵀ x``, ``x_c dC``), counted as ``10 M N n`` flops with ``n = N / groups``.

Entry points: :func:`main` (the ``jax-batchinhib bench`` command and
``benchmarks/run.py``), :func:`run` (returns the results dict), :func:`render_markdown`
(renders any number of results dicts).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEMA = 2

# ---------------------------------------------------------------------------- targets

#: The project's targets (CPU, ratios from one run). ``(family, metric, op, value, where)``.
TARGETS = (
    ("batch_norm", "ours/autodiff", "<=", 0.7, "every shape"),
    ("batch_norm", "ours/flax", "<=", 0.9, "every shape"),
    ("batch_norm", "copy_fraction", ">=", 0.5, "largest shape"),
    ("batch_norm", "resid_ratio_autodiff", "<=", 0.5, "every shape"),
    ("batch_inhib", "ours/autodiff", "<=", 0.8, "every shape"),
    ("batch_inhib", "matmul_fraction", ">=", 0.7, "(1024, 512)"),
    ("batch_inhib", "resid_ratio_autodiff", "<=", 0.7, "every shape"),
    ("dropout", "ours/autodiff", "<=", 1.0, "every shape"),
    ("dropout", "resid_ratio_autodiff", "<=", 0.125, "every shape"),
    ("softmax_cross_entropy", "ours/autodiff", "<=", 0.9, "every shape"),
    ("softmax_cross_entropy", "ours/optax", "<=", 0.9, "every shape"),
    ("cnn_train_step", "ours/flax", "<=", 1.0, "end to end"),
    ("cnn_train_step", "temp_ratio_flax", "<=", 0.7, "XLA temp of the step"),
)


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """The machine: CPU model, cores, jax/jaxlib/flax versions, the default device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "xla_flags": os.environ.get("XLA_FLAGS") or None,
    }
    for mod in ("flax", "optax"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            info[mod] = None
    return info


# ------------------------------------------------------------------------------ cases


@dataclasses.dataclass
class Contender:
    """One contender of a case.

    ``step(*args)`` is what gets jitted and timed. ``fwd(*primals)`` (optional) is the
    function whose :func:`jax.vjp` residuals are measured.
    """

    name: str
    step: Callable
    args: tuple
    fwd: Callable | None = None
    primals: tuple = ()
    role: str = "contender"  # or "limit" (copy / matmul: timed, not a ratio)
    vary: tuple | None = None  # arguments the loop varies (default: the large ones)


@dataclasses.dataclass
class Case:
    name: str
    family: str
    shape: tuple
    dtype: str
    build: Callable[[], list[Contender]]
    note: str = ""
    limit: dict | None = None  # {"kind": "bandwidth", "bytes": ...} or flops


def _grad_step(fwd, ndiff: int):
    """``step(*diff, *nondiff, ct)``: value, output and grads of ``sum(fwd(...) * ct)``."""

    def loss(*a):
        *p, ct = a
        y = fwd(*p)
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y

    return jax.value_and_grad(loss, argnums=tuple(range(ndiff)), has_aux=True)


def _highest(f):
    """Trace ``f`` at full float32 matmul precision (the ops ask for it; GPUs would
    otherwise give the reference TF32 matmuls)."""

    @functools.wraps(f)
    def g(*a, **k):
        with jax.default_matmul_precision("highest"):
            return f(*a, **k)

    return g


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _closed(f, tail):
    """``f`` with its trailing (non-differentiated) arguments bound."""
    return lambda *p: f(*p, *tail)


def _contenders(fwds: dict, diff: tuple, nondiff: tuple, ct, roles=None) -> list[Contender]:
    out = []
    for name, f in fwds.items():
        step = _grad_step(f, len(diff))
        out.append(
            Contender(
                name,
                step,
                (*diff, *nondiff, ct),
                fwd=_closed(f, nondiff),
                primals=diff,
            )
        )
    return out


def _bn_case(shape, dtype) -> Case:
    import flax.linen as nn

    import jax_batchinhib as jb
    from jax_batchinhib import reference as ref

    dt = jnp.dtype(dtype)
    c = shape[-1]

    def build():
        k = _keys(4)
        x = (jax.random.normal(k[0], shape, jnp.float32) * 2 + 0.5).astype(dt)
        scale = 1 + 0.1 * jax.random.normal(k[1], (c,), jnp.float32)
        bias = 0.1 * jax.random.normal(k[2], (c,), jnp.float32)
        ct = jax.random.normal(k[3], shape, jnp.float32).astype(dt)
        stats = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}

        def flax_f(fast):
            # flax's default (use_fast_variance=True) is one pass, E[x^2] - E[x]^2; the
            # two-pass variant is the one that matches our (and the reference's) numerics.
            bn = nn.BatchNorm(
                use_running_average=False,
                momentum=0.9,
                epsilon=1e-5,
                dtype=dt,
                param_dtype=jnp.float32,
                use_fast_variance=fast,
            )

            def f(x, scale, bias):
                y, _ = bn.apply(
                    {"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
                    x,
                    mutable=["batch_stats"],
                )
                return y

            return f

        fwds = {
            "ours": lambda x, s, b: jb.batch_norm(x, s, b)[0],
            "autodiff": lambda x, s, b: ref.batch_norm(x, s, b)[0],
            "flax": flax_f(True),
            "flax_2pass": flax_f(False),
            "ours_2pass": lambda x, s, b: jb.batch_norm(x, s, b, use_fast_variance=False)[0],
        }
        cs = _contenders(fwds, (x, scale, bias), (), ct)
        copy = jax.jit(lambda a, b: (a + 1, b + 1))  # same bytes as read x, dy; write y, dx
        cs.append(Contender("copy", copy, (x, ct), role="limit"))
        return cs

    size = math.prod(shape)
    return Case(
        f"batch_norm/{'x'.join(map(str, shape))}/{dt.name}",
        "batch_norm",
        tuple(shape),
        dt.name,
        build,
        limit={
            "kind": "bandwidth",
            "bytes": 4 * size * dt.itemsize,
            "count": "read x, dy; write y, dx",
        },
    )


def _bi_case(shape, groups=1, dtype=jnp.float32) -> Case:
    import jax_batchinhib as jb
    from jax_batchinhib import reference as ref

    m, nf = shape
    n = nf // groups
    dt = jnp.dtype(dtype)

    def build():
        k = _keys(5, 1)
        mix = jax.random.normal(k[4], (nf, nf), jnp.float32) / math.sqrt(nf)
        x = jax.random.normal(k[0], shape, jnp.float32)
        x = (x + 0.5 * x @ mix).astype(dt)  # correlated features
        alpha = 0.5 * jax.random.normal(k[1], jb.alpha_shape(nf, groups), jnp.float32)
        ct = jax.random.normal(k[2], shape, jnp.float32).astype(dt)
        fwds = {
            "ours": lambda x, a: jb.batch_inhib(x, a, groups=groups)[0],
            "autodiff": _highest(lambda x, a: ref.batch_inhib(x, a, groups=groups)[0]),
        }
        cs = _contenders(fwds, (x, alpha), (), ct)
        a = x.astype(jnp.float32).reshape(m, groups, n)
        b = jax.random.normal(k[3], (groups, n, n), jnp.float32)
        mm = jax.jit(
            lambda a, b: jnp.einsum("mgi,gik->mgk", a, b, precision=jax.lax.Precision.HIGHEST)
        )
        cs.append(Contender("matmul", mm, (a, b), role="limit", vary=(1,)))
        return cs

    g = f"/g{groups}" if groups > 1 else ""
    return Case(
        f"batch_inhib/{m}x{nf}{g}/{dt.name}",
        "batch_inhib",
        tuple(shape),
        dt.name,
        build,
        note=f"groups={groups}" if groups > 1 else "",
        limit={
            "kind": "flops",
            "flops": 10 * m * nf * n,
            "matmul_flops": 2 * m * nf * n,
            "count": "5 matmuls of 2 M N n flops (fwd: cov, x R^T; bwd: dy R, dy^T x, xc dC)",
        },
    )


def _dropout_case(shape, rate=0.5) -> Case:
    import flax.linen as nn

    import jax_batchinhib as jb
    from jax_batchinhib import reference as ref

    def build():
        k = _keys(3, 2)
        x = jax.random.normal(k[0], shape, jnp.float32)
        ct = jax.random.normal(k[1], shape, jnp.float32)
        key = k[2]
        drop = nn.Dropout(rate, deterministic=False)
        fwds = {
            "ours": lambda x, key: jb.dropout(x, rate, key),  # residual="bits"
            "autodiff": lambda x, key: ref.dropout(x, rate, key),
            "flax": lambda x, key: drop.apply({}, x, rngs={"dropout": key}),
            "ours_key": lambda x, key: jb.dropout(x, rate, key, residual="key"),
            "ours_bytes": lambda x, key: jb.dropout(x, rate, key, residual="bytes"),
        }
        out = []
        for name, f in fwds.items():
            out.append(
                Contender(
                    name,
                    _grad_step(f, 1),
                    (x, key, ct),
                    fwd=_closed(f, (key,)),
                    primals=(x,),
                )
            )
        return out

    return Case(
        f"dropout/{'x'.join(map(str, shape))}/float32",
        "dropout",
        tuple(shape),
        "float32",
        build,
        note=f"rate={rate}; ours keeps the bit-packed mask, ours_key the key, ours_bytes "
        "a uint8 mask",
    )


def _sce_case(shape, integer: bool = False) -> Case:
    """softmax_cross_entropy with one-hot labels (``integer=False``) or
    softmax_cross_entropy_with_integer_labels (``integer=True``: no target, reported beside
    the one-hot case), against autodiff of its reference and optax's."""
    import optax

    import jax_batchinhib as jb
    from jax_batchinhib import reference as ref

    name = "softmax_cross_entropy" + ("_with_integer_labels" if integer else "")

    def build():
        k = _keys(3, 3)
        logits = 3 * jax.random.normal(k[0], shape, jnp.float32)
        labels = jax.random.randint(k[1], shape[:-1], 0, shape[-1])
        if not integer:
            labels = jax.nn.one_hot(labels, shape[-1])
        ct = jax.random.normal(k[2], shape[:-1], jnp.float32)
        fwds = {
            "ours": getattr(jb, name),
            "autodiff": getattr(ref, name),
            "optax": getattr(optax, name),
        }
        return _contenders(fwds, (logits,), (labels,), ct)

    family = "sce_integer_labels" if integer else "softmax_cross_entropy"
    return Case(
        f"{family}/{'x'.join(map(str, shape))}/float32",
        family,
        tuple(shape),
        "float32",
        build,
        note=f"grad w.r.t. logits, {'integer' if integer else 'one-hot'} labels",
    )


def _cnn_case(batch=128, image=32, channels=3, classes=10) -> Case:
    """A jitted optax train step of jax_batchinhib.apps.models.CNN, our norm vs flax's."""

    def build():
        import optax

        from jax_batchinhib.apps import models

        k = _keys(4, 4)
        x = jax.random.normal(k[0], (batch, image, image, channels), jnp.float32)
        labels = jax.nn.one_hot(jax.random.randint(k[1], (batch,), 0, classes), classes)
        tx = optax.sgd(0.05, momentum=0.9)
        out = []
        variants = (
            ("ours", "batchnorm", False),
            ("autodiff", "batchnorm", True),
            ("flax", "flax_batchnorm", False),
        )
        for name, norm, autodiff in variants:
            model = _make_cnn(models, norm, classes, autodiff)
            variables = model.init({"params": k[2], "dropout": k[3]}, x, train=False)
            params = variables["params"]
            state = {c: v for c, v in variables.items() if c != "params"}
            opt = tx.init(params)

            def loss_fn(params, state, x, labels, key, model=model):
                logits, upd = model.apply(
                    {"params": params, **state},
                    x,
                    train=True,
                    rngs={"dropout": key},
                    mutable=list(state.keys()),
                )
                loss = optax.softmax_cross_entropy(logits, labels).mean()
                return loss, upd

            def step(params, state, opt, x, labels, key, loss_fn=loss_fn):
                (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(
                    params, state, x, labels, key
                )
                updates, opt = tx.update(g, opt, params)
                return optax.apply_updates(params, updates), {**state, **upd}, opt, loss

            def fwd(params, state=state, loss_fn=loss_fn):
                return loss_fn(params, state, x, labels, k[3])[0]

            out.append(Contender(name, step, (params, state, opt, x, labels, k[3]), fwd, (params,)))
        return out

    return Case(
        f"cnn_train_step/b{batch}/float32",
        "cnn_train_step",
        (batch, image, image, channels),
        "float32",
        build,
        note="optax sgd+momentum step of jax_batchinhib.apps.models.CNN(features=(32, 64)) on "
        f"({batch}, {image}, {image}, {channels}); ours: norm='batchnorm', autodiff: the same "
        "with use_autodiff=True, flax: norm='flax_batchnorm'",
    )


def _make_cnn(models, norm, classes, autodiff=False):
    import inspect

    sig = inspect.signature(models.CNN)
    kw = {"norm": norm, "features": (32, 64)}
    if "use_autodiff" in sig.parameters:
        kw["use_autodiff"] = autodiff
    elif autodiff:
        raise ValueError("models.CNN has no use_autodiff option")
    for name in ("num_classes", "classes", "n_classes"):
        if name in sig.parameters:
            kw[name] = classes
            break
    return models.CNN(**kw)


def all_cases(large: bool | None = None) -> list[Case]:
    """Every case, in run order; with ``large`` (default: on an accelerator) also
    the larger shapes where an accelerator's bandwidth and flops limits mean something."""
    if large is None:
        large = jax.devices()[0].platform != "cpu"
    cases = []
    bn_shapes = [(256, 1024), (4096, 512), (64, 16, 16, 128)]
    if large:
        bn_shapes += LARGE_BN
    for dt in (jnp.float32, jnp.bfloat16):
        for shape in bn_shapes:
            cases.append(_bn_case(shape, dt))
    for shape in ((256, 256), (1024, 512), (4096, 128)):
        cases.append(_bi_case(shape))
    cases.append(_bi_case((1024, 2048), groups=16))
    if large:
        cases += [_bi_case(shape, groups=g) for shape, g in LARGE_BI]
    cases += whitening_cases()
    cases.append(_dropout_case((4096, 1000)))
    cases.append(_sce_case((4096, 1000)))
    cases.append(_sce_case((4096, 1000), integer=True))
    cases.append(_cnn_case())
    return cases


#: Shapes added on accelerators (``all_cases(large=True)``): big enough that one step takes
#: tens of microseconds to milliseconds of kernel time on an H100.
LARGE_BN = ((65536, 1024), (256, 32, 32, 256))
LARGE_BI = (((16384, 1024), 1), ((16384, 1024), 16), ((16384, 4096), 16))


#: The --quick subset (a 2-core CPU in about a minute).
QUICK = (
    "batch_norm/256x1024/float32",
    "batch_norm/4096x512/float32",
    "batch_inhib/1024x512/float32",
    "softmax_cross_entropy/4096x1000/float32",
)


def select_cases(
    patterns: Sequence[str] | None, quick: bool, large: bool | None = None
) -> list[Case]:
    """``patterns`` (names or globs) from every case (the large ones included unless
    ``large`` is False); else the quick subset, or every case of this platform
    (``all_cases(large)``). Raises ``ValueError`` when ``patterns`` match no case."""
    if patterns:
        cases = all_cases(large=large is not False)

        def hit(c, p):
            return fnmatch.fnmatch(c.name, p) or c.name == p

        unmatched = [p for p in patterns if not any(hit(c, p) for c in cases)]
        if unmatched:
            names = ", ".join(c.name for c in cases)
            which = unmatched[0] if len(patterns) > 1 else list(patterns)
            raise ValueError(f"{which!r} matched no case; cases: {names}")
        return [c for c in cases if any(hit(c, p) for p in patterns)]
    cases = all_cases(large)
    if quick:
        return [c for c in cases if c.name in QUICK]
    return cases


# ------------------------------------------------------------------- train-step memory

#: The models of :func:`train_step_memory`: name -> (model class, input shape, kwargs,
#: {contender: (norm, use_autodiff)}). flax has no BatchInhib: the MLP's flax contender
#: is the same MLP with flax.linen.BatchNorm alone. ``no_norm``: the CNN without any
#: normalization, the floor that no normalization layer can go below.
MEMORY_MODELS = {
    "cnn": (
        "CNN",
        (128, 32, 32, 3),
        {"features": (32, 64)},
        {
            "ours": ("batchnorm", False),
            "autodiff": ("batchnorm", True),
            "flax": ("flax_batchnorm", False),
            "no_norm": ("none", False),
        },
    ),
    "mlp_inhib": (
        "MLP",
        (256, 784),
        {"features": (512, 512), "dropout_rate": 0.1},
        {
            "ours": ("batchnorm+inhib", False),
            "autodiff": ("batchnorm+inhib", True),
            "ours_bn_only": ("batchnorm", False),
            "flax": ("flax_batchnorm", False),
        },
    ),
}


def train_step_memory(models: Sequence[str] = tuple(MEMORY_MODELS), scale: int = 1) -> dict:
    """XLA's memory analysis of a compiled optax train step (SGD with momentum, softmax
    cross-entropy, running statistics updated) of each model in :data:`MEMORY_MODELS`,
    with our layers, autodiff of our references (``use_autodiff=True``) and flax's.

    ``scale`` multiplies the batch. Returns ``{model: {contender: {temp_bytes,
    argument_bytes, output_bytes, alias_bytes, peak_bytes, generated_code_bytes}}}``
    plus ``ratios`` (temp and peak, ours / each other contender).
    """
    import optax

    from jax_batchinhib.apps import models as M

    out: dict[str, Any] = {}
    for name in models:
        cls, shape, kw, variants = MEMORY_MODELS[name]
        shape = (shape[0] * scale, *shape[1:])
        k = _keys(4, 5)
        x = jax.random.normal(k[0], shape, jnp.float32)
        labels = jax.nn.one_hot(jax.random.randint(k[1], (shape[0],), 0, 10), 10)
        tx = optax.sgd(0.05, momentum=0.9)
        rows: dict[str, Any] = {}
        for cname, (norm, autodiff) in variants.items():
            model = getattr(M, cls)(norm=norm, use_autodiff=autodiff, **kw)
            variables = model.init({"params": k[2], "dropout": k[3]}, x, train=False)
            params = variables["params"]
            state = {c: v for c, v in variables.items() if c != "params"}
            opt = tx.init(params)

            def step(params, state, opt, x, labels, key, model=model, tx=tx):
                def loss_fn(params):
                    logits, upd = model.apply(
                        {"params": params, **state},
                        x,
                        train=True,
                        rngs={"dropout": key},
                        mutable=list(state),
                    )
                    return optax.softmax_cross_entropy(logits, labels).mean(), upd

                (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt = tx.update(g, opt, params)
                return optax.apply_updates(params, updates), {**state, **upd}, opt, loss

            comp = jax.jit(step).lower(params, state, opt, x, labels, k[3]).compile()
            ma = comp.memory_analysis()
            rows[cname] = {
                "temp_bytes": int(ma.temp_size_in_bytes),
                "argument_bytes": int(ma.argument_size_in_bytes),
                "output_bytes": int(ma.output_size_in_bytes),
                "alias_bytes": int(ma.alias_size_in_bytes),
                "peak_bytes": int(getattr(ma, "peak_memory_in_bytes", 0) or 0) or None,
                "generated_code_bytes": int(ma.generated_code_size_in_bytes),
                "input_bytes": int(x.nbytes),
            }
        ratios = {}
        for other in rows:
            if other == "ours":
                continue
            r = {"temp": rows["ours"]["temp_bytes"] / max(rows[other]["temp_bytes"], 1)}
            if rows["ours"]["peak_bytes"] and rows[other]["peak_bytes"]:
                r["peak"] = rows["ours"]["peak_bytes"] / rows[other]["peak_bytes"]
            ratios[f"ours/{other}"] = r
        out[name] = {
            "model": cls,
            "input_shape": list(shape),
            "kwargs": {k2: list(v) if isinstance(v, tuple) else v for k2, v in kw.items()},
            "contenders": rows,
            "ratios": ratios,
        }
    return out


def render_memory(mem: dict) -> list[str]:
    """Markdown lines for :func:`train_step_memory`'s result."""
    lines = [
        "| model | contender | temp | peak | arguments | outputs | temp ours/this |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in mem.values():
        for cname, r in m["contenders"].items():
            rat = m["ratios"].get(f"ours/{cname}", {}).get("temp")
            lines.append(
                f"| {m['model']} {'x'.join(map(str, m['input_shape']))} | {cname} | "
                f"{_fmt_b(r['temp_bytes'])} | {_fmt_b(r['peak_bytes'])} | "
                f"{_fmt_b(r['argument_bytes'])} | {_fmt_b(r['output_bytes'])} | "
                f"{'-' if rat is None else f'**{rat:.2f}**'} |"
            )
    return lines


# ------------------------------------------------------------------- scaling curves

#: (layer, fixed N for the sweep over m, fixed m for the sweep over N).
SCALING_LAYERS = ("batch_norm", "batch_inhib", "batch_inhib_g8", "iter_norm", "zca_norm")
SCALING_M = (256, 512, 1024, 2048, 4096)
SCALING_N = (64, 128, 256, 512)
SCALING_FIXED = {"m": 1024, "n": 256}


def _scaling_fwd(layer: str):
    """``f(x, p)`` and a parameter maker for one layer of the scaling curves, or None
    when the layer does not exist in this version of the library (the whitening ops are
    added here when they land: any op of that name in :mod:`jax_batchinhib` is used,
    called as ``op(x)[0]`` when it returns a tuple)."""
    import jax_batchinhib as jb

    if layer == "batch_norm":
        return (lambda x, p: jb.batch_norm(x, p, None)[0]), (lambda n: jnp.ones((n,)))
    if layer.startswith("batch_inhib"):
        g = int(layer.split("_g")[1]) if "_g" in layer else 1
        return (
            (lambda x, a: jb.batch_inhib(x, a, groups=g)[0]),
            (lambda n: 0.1 * jax.random.normal(jax.random.key(0), jb.alpha_shape(n, g))),
        )
    op = getattr(jb, layer, None)
    if op is None:
        return None

    def f(x, p):
        y = op(x)
        return (y[0] if isinstance(y, tuple) else y) + 0 * jnp.sum(p)

    return f, (lambda n: jnp.zeros(()))


def scaling(
    layers: Sequence[str] = SCALING_LAYERS,
    ms: Sequence[int] = SCALING_M,
    ns: Sequence[int] = SCALING_N,
    fixed: dict | None = None,
    repeats: int = 5,
    log=print,
) -> dict:
    """Time (median of ``repeats`` interleaved rounds) and kept bytes of a jitted
    forward+backward step of each layer against m (rows) at fixed N, and against N at
    fixed m; a least-squares slope of log(time) and log(kept) on log(m) or log(N)."""
    fixed = fixed or SCALING_FIXED
    out: dict[str, Any] = {"fixed": fixed, "layers": {}, "skipped": []}
    for layer in layers:
        made = _scaling_fwd(layer)
        if made is None:
            out["skipped"].append(layer)
            log(f"scaling: {layer} is not in this library version; skipped")
            continue
        f, mk = made
        res = {}
        for sweep, values in (("m", ms), ("n", ns)):
            shapes = [(v, fixed["n"]) if sweep == "m" else (fixed["m"], v) for v in values]
            if layer.startswith("batch_inhib_g"):
                g = int(layer.split("_g")[1])
                shapes = [s for s in shapes if s[1] % g == 0]
            steps, kept = [], []
            for m, n in shapes:
                x = jax.random.normal(jax.random.key(m + n), (m, n), jnp.float32)
                p = mk(n)
                ct = jax.random.normal(jax.random.key(1), (m, n), jnp.float32)
                st = jax.jit(_grad_step(f, 2)).lower(x, p, ct).compile()
                _block(st(x, p, ct))
                steps.append((st, (x, p, ct)))
                kept.append(residual_bytes(f, (x, p))["resid_bytes"])
            times = [[] for _ in steps]
            for r in range(repeats):
                order = list(range(len(steps)))
                order = order[r % len(order) :] + order[: r % len(order)]
                for i in order:
                    st, a = steps[i]
                    calls = 1
                    times[i].append(_time_calls(st, a, calls, "each") / calls)
            med = [statistics.median(t) for t in times]
            xs = [s[0] if sweep == "m" else s[1] for s in shapes]
            res[sweep] = {
                "values": xs,
                "time_s": med,
                "kept_bytes": kept,
                "time_slope": _slope(xs, med),
                "kept_slope": _slope(xs, kept),
            }
            log(
                f"scaling: {layer} vs {sweep}: time slope {res[sweep]['time_slope']:.2f}, "
                f"kept slope {res[sweep]['kept_slope']:.2f}"
            )
        out["layers"][layer] = res
    return out


def _slope(xs, ys) -> float:
    lx = np.log(np.asarray(xs, float))
    ly = np.log(np.maximum(np.asarray(ys, float), 1e-30))
    return float(np.polyfit(lx, ly, 1)[0])


def plot_scaling(sc: dict, path: str) -> str:
    """Log-log plot of :func:`scaling`'s result (time and kept bytes, against m and N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    fx = sc["fixed"]
    for layer, res in sc["layers"].items():
        for col, sweep in enumerate(("m", "n")):
            r = res[sweep]
            for row, (key, sl) in enumerate(
                (("time_s", "time_slope"), ("kept_bytes", "kept_slope"))
            ):
                axes[row][col].loglog(
                    r["values"], r[key], "o-", label=f"{layer} (slope {r[sl]:.2f})"
                )
    for col, sweep in enumerate(("m", "n")):
        other = f"N = {fx['n']}" if sweep == "m" else f"m = {fx['m']}"
        xl = "rows m" if sweep == "m" else "features N"
        axes[0][col].set(title=f"step time vs {xl} ({other})", xlabel=xl, ylabel="seconds")
        axes[1][col].set(title=f"kept bytes vs {xl} ({other})", xlabel=xl, ylabel="bytes")
        for row in (0, 1):
            axes[row][col].legend(fontsize=7)
            axes[row][col].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _make_parent(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def render_scaling(sc: dict, image: str | None = None) -> list[str]:
    lines = []
    if image:
        lines += [f"![scaling curves]({image})", ""]
    lines += [
        "| layer | time slope vs m | kept slope vs m | time slope vs N | kept slope vs N |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layer, r in sc["layers"].items():
        lines.append(
            f"| {layer} | {r['m']['time_slope']:.2f} | {r['m']['kept_slope']:.2f} | "
            f"{r['n']['time_slope']:.2f} | {r['n']['kept_slope']:.2f} |"
        )
    if sc.get("skipped"):
        lines += ["", f"Not in this library version (skipped): {', '.join(sc['skipped'])}."]
    return lines


# ----------------------------------------------------------------------------- timing


def _block(out):
    jax.block_until_ready(out)
    return out


def _nbytes(tree) -> int:
    return int(sum(getattr(v, "nbytes", 0) for v in jax.tree.leaves(tree)))


def residual_bytes(fwd, primals) -> dict:
    """Bytes of the unique array leaves of the function :func:`jax.vjp` returns."""
    _, vjp_fn = jax.vjp(fwd, *primals)
    leaves = [v for v in jax.tree.leaves(vjp_fn) if hasattr(v, "nbytes")]
    seen, total, count = set(), 0, 0
    inputs = {id(p) for p in jax.tree.leaves(primals)}
    in_bytes = 0
    for v in leaves:
        if id(v) in seen:
            continue
        seen.add(id(v))
        total += int(v.nbytes)
        count += 1
        if id(v) in inputs:
            in_bytes += int(v.nbytes)
    del vjp_fn
    return {"resid_bytes": total, "resid_leaves": count, "resid_input_bytes": in_bytes}


def _memory(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without it
        ma = None
    if ma is None:
        return {"temp_bytes": None}
    return {
        "temp_bytes": int(ma.temp_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "argument_bytes": int(ma.argument_size_in_bytes),
    }


def looped(step: Callable, k: int, unroll: int = 1, vary: Sequence[int] | None = None) -> Callable:
    """``k * unroll`` chained executions of ``step(*args)`` in one program.

    ``lax.fori_loop`` with a static trip count ``k`` (XLA knows it, so a GPU runs the body
    without reading a loop predicate back every iteration), whose body calls ``step``
    ``unroll`` times. Each call sees its large floating arguments (at least a quarter of
    the largest one's size: ``x`` and the cotangent; or the arguments ``vary`` lists) as
    ``arg + eps``, with ``eps = 1e-30 * (first output element of the previous call)``, and
    its PRNG keys folded with the call's index. That is a true data dependence on the
    previous call, so XLA can neither hoist work out of the loop (e.g. the forward
    statistics, which depend on ``x`` alone) nor merge two calls; the values do not
    change (``eps`` is far below the arguments' round-off), and the add is elementwise,
    fused into the step's first kernels (an operand of a library call, a matmul's or a
    convolution's, is written once more: the matmul baseline therefore varies its small
    ``(n, n)`` operand). Each call writes its whole output into its own slot of the loop
    state and the program returns every slot, so no output is dropped as dead: every call
    computes and writes all that the step does alone. ``unroll > 1`` spreads the loop's own
    overhead (on a GPU about 10 µs an iteration, as much as a small step) over that many
    calls.
    """

    def loop(*args):
        shapes = jax.eval_shape(step, *args)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if vary is None:
            big = max((v.size for v in jax.tree.leaves(args) if _is_float(v)), default=0)
            which = tuple(
                jax.tree.map(lambda v: _is_float(v) and v.ndim > 0 and 4 * v.size >= big, t)
                for t in args
            )
        else:
            which = tuple(
                jax.tree.map(lambda v, i=i: i in vary and _is_float(v), t)
                for i, t in enumerate(args)
            )

        def perturb(v, w, eps, n):
            if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
                return jax.random.fold_in(v, n)
            return (v + eps.astype(v.dtype)) if w else v

        def body(i, carry):
            eps, outs = carry
            new = []
            for j in range(unroll):
                n = i * unroll + j
                a = jax.tree.map(lambda v, w, e=eps, n=n: perturb(v, w, e, n), args, which)
                out = step(*a)
                eps = 1e-30 * jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32)
                new.append(out)
            return eps, tuple(new)

        return jax.lax.fori_loop(0, k, body, (jnp.float32(0), (zero,) * unroll))[1]

    return loop


def _is_float(v) -> bool:
    return jnp.issubdtype(v.dtype, jnp.floating)


def _parallel(fn, items, workers):
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(workers, len(items))) as ex:
        return list(ex.map(fn, items))


def _time_calls(f, a, n, sync):
    """Seconds for ``n`` calls of ``f(*a)``: each blocked on, or all dispatched then one
    block (``batch``: the calls queue on the device back to back)."""
    if sync == "each":
        t0 = time.perf_counter()
        for _ in range(n):
            _block(f(*a))
        return time.perf_counter() - t0
    out = None
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*a)
    _block(out)
    return time.perf_counter() - t0


def time_case(
    case: Case,
    *,
    repeats: int,
    min_time: float,
    budget: float,
    sync: str,
    max_steps: int = 1000,
    workers: int = 1,
    method: str = "loop",
    unroll: int = 8,
    log=print,
) -> dict:
    """Compile, measure memory, then time every contender of ``case`` interleaved.

    ``method="calls"`` skips step 2 (``K = 1``, the compiled step itself is called): on
    a CPU, where one dispatch costs microseconds against steps of milliseconds, and where
    XLA:CPU compiles convolutions and some dots inside a while loop into much slower code.

    1. ``step`` is compiled alone: XLA's temp size, the residual bytes, and the time of one
       dispatch of one step (``single_call_s``, median of 3), which bounds a step's time
       from above.
    2. ``looped(step, K)`` is compiled with ``K = ceil(min_time / single_call_s)`` (at most
       ``max_steps``), so that one call runs about ``min_time`` or more of kernels even
       where a single step is mostly dispatch overhead. If one call still takes less than
       ``min_time``, a timing is ``calls`` back-to-back calls (``calls * K`` steps).
    3. ``rounds`` rounds (at most ``repeats``, about ``budget`` seconds), each timing every
       contender once in a rotated order; a contender's time per step is
       ``timing / (calls * K)``, its figure the median over rounds.
    """
    t_case = time.perf_counter()
    contenders = case.build()
    res: dict[str, Any] = {
        "name": case.name,
        "family": case.family,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "note": case.note,
        "contenders": {},
    }

    def compile_step(c):
        t0 = time.perf_counter()
        comp = jax.jit(c.step).lower(*c.args).compile()
        return comp, round(time.perf_counter() - t0, 3)

    steps = _parallel(compile_step, contenders, workers)
    single, plain = {}, {}
    for c, (comp, cs) in zip(contenders, steps, strict=True):
        info = {"role": c.role, "compile_s": cs}
        info.update(_memory(comp))
        _block(comp(*c.args))  # first run
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            _block(comp(*c.args))
            ts.append(time.perf_counter() - t0)
        single[c.name] = max(statistics.median(ts), 1e-7)
        plain[c.name] = comp
        info["single_call_s"] = single[c.name]
        if c.fwd is not None:
            info.update(residual_bytes(c.fwd, c.primals))
        res["contenders"][c.name] = info
    del steps

    if method == "calls":
        ks = {c.name: 1 for c in contenders}
    else:
        ks = {
            c.name: max(1, min(max_steps, math.ceil(min_time / single[c.name]))) for c in contenders
        }
    # steps per loop iteration (at least 4 iterations); K rounded up to a multiple
    unrolls = {n: max(1, min(unroll, k // 4)) for n, k in ks.items()}
    ks = {n: math.ceil(k / unrolls[n]) * unrolls[n] for n, k in ks.items()}

    def compile_loop(c):
        t0 = time.perf_counter()
        u = unrolls[c.name]
        comp = jax.jit(looped(c.step, ks[c.name] // u, u, c.vary)).lower(*c.args).compile()
        return comp, round(time.perf_counter() - t0, 3)

    if method == "calls":
        loops = [(plain[c.name], None) for c in contenders]
    else:
        loops = _parallel(compile_loop, contenders, workers)
    del plain
    compiled, calls, per_call = {}, {}, {}
    for c, (comp, cs) in zip(contenders, loops, strict=True):
        info = res["contenders"][c.name]
        info["loop_compile_s"] = cs
        _block(comp(*c.args))  # first run
        t = max(_time_calls(comp, c.args, 1, "each"), 1e-7)
        calls[c.name] = max(1, min(1000, math.ceil(min_time / t)))
        per_call[c.name] = t
        info["steps_per_call"] = ks[c.name]
        info["steps_per_iteration"] = unrolls[c.name]
        info["calls_per_timing"] = calls[c.name]
        compiled[c.name] = (comp, c.args)

    per_round = sum(per_call[n] * calls[n] for n in compiled)
    rounds = max(3, min(repeats, int(budget / max(per_round, 1e-9))))
    times = {name: [] for name in compiled}
    names = list(compiled)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            f, a = compiled[name]
            dt = _time_calls(f, a, calls[name], sync)
            times[name].append(dt / (calls[name] * ks[name]))
    for name, ts in times.items():
        info = res["contenders"][name]
        info["median_s"] = statistics.median(ts)
        info["min_s"] = min(ts)
        info["times_s"] = ts
        if info["median_s"] > 1.25 * info["single_call_s"]:
            log(
                f"  warning: {name}: a step inside the loop ({_fmt_t(info['median_s'])}) is "
                f"slower than one dispatch of it alone ({_fmt_t(info['single_call_s'])})"
            )
    res["rounds"] = rounds
    res["sync"] = sync
    res["ratios"] = _ratios(res, times)
    res["limit"] = _limit(case, res)
    res["wall_s"] = round(time.perf_counter() - t_case, 2)
    log(_one_line(res))
    return res


def _ratios(res, times) -> dict:
    out = {}
    c = res["contenders"]
    if "ours" not in c:
        return out
    for other, info in c.items():
        if other == "ours" or info["role"] != "contender":
            continue
        per_round = [a / b for a, b in zip(times["ours"], times[other], strict=True)]
        r = {
            "time": c["ours"]["median_s"] / info["median_s"],
            "time_round_min": min(per_round),
            "time_round_max": max(per_round),
        }
        if c["ours"].get("resid_bytes") is not None and info.get("resid_bytes"):
            r["resid"] = c["ours"]["resid_bytes"] / info["resid_bytes"]
        if c["ours"].get("temp_bytes") is not None and info.get("temp_bytes"):
            r["temp"] = c["ours"]["temp_bytes"] / info["temp_bytes"]
        out[f"ours/{other}"] = r
    return out


def _limit(case: Case, res) -> dict | None:
    return _limit_from(case.limit, res["contenders"])


def _limit_from(lim: dict | None, c: dict) -> dict | None:
    """The hardware-limit figures of ``lim`` (the case's bytes or flops) from the
    contenders' median times ``c``: ours' rate, the copy's or matmul's, their fraction."""
    if lim is None or "ours" not in c:
        return None
    measured = {"ours_GBps", "copy_GBps", "ours_GFLOPps", "matmul_GFLOPps", "fraction"}
    lim = {k: v for k, v in lim.items() if k not in measured}
    t = c["ours"]["median_s"]
    if lim["kind"] == "bandwidth":
        gbs = lim["bytes"] / t / 1e9
        copy = lim["bytes"] / c["copy"]["median_s"] / 1e9
        return {**lim, "ours_GBps": gbs, "copy_GBps": copy, "fraction": gbs / copy}
    gf = lim["flops"] / t / 1e9
    mm = lim["matmul_flops"] / c["matmul"]["median_s"] / 1e9
    return {**lim, "ours_GFLOPps": gf, "matmul_GFLOPps": mm, "fraction": gf / mm}


def _fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_b(b):
    if b is None:
        return "-"
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b} B"


def _one_line(res) -> str:
    parts = [f"{res['name']}:"]
    for name, info in res["contenders"].items():
        parts.append(f"{name} {_fmt_t(info.get('median_s'))}")
    for pair, r in res["ratios"].items():
        parts.append(f"{pair}={r['time']:.2f}")
    if res.get("limit"):
        parts.append(f"limit {100 * res['limit']['fraction']:.0f}%")
    parts.append(f"[{res['wall_s']:.0f} s]")
    return "  ".join(parts)


# ------------------------------------------------------------------------------- run


def run(
    cases: Sequence[Case],
    *,
    repeats: int = 15,
    min_time: float = 0.02,
    budget: float = 20.0,
    sync: str = "auto",
    max_steps: int = 1000,
    workers: int | None = None,
    method: str = "auto",
    unroll: int = 8,
    log=print,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Time ``cases``; returns the results dict (JSON-serialisable).

    ``on_case(partial_results)`` is called after each case (``main`` writes the JSON
    there, so an interrupted run keeps what it measured). ``workers``: threads compiling a
    case's contenders at once (default 1 on CPU; on an accelerator, where compiling
    dominates the wall time, a quarter of the CPU cores, from 1 to 4).
    """
    info = machine_info()
    if sync == "auto":
        sync = "each" if info["platform"] == "cpu" else "batch"
    if method == "auto":
        method = "calls" if info["platform"] == "cpu" else "loop"
    if method not in ("loop", "calls"):
        raise ValueError(f"bench.run: method must be 'auto', 'loop' or 'calls', got {method!r}")
    if workers is None:
        workers = 1 if info["platform"] == "cpu" else min(4, max(1, (os.cpu_count() or 1) // 4))
    settings = {
        "method": method,
        "repeats": repeats,
        "min_time_s": min_time,
        "max_steps": max_steps,
        "unroll": unroll,
        "case_budget_s": budget,
        "sync": sync,
        "compile_workers": workers,
        "statistic": "median over rounds of timing / (calls * K); "
        "ratio = median(ours) / median(theirs)",
    }
    t0 = time.perf_counter()
    log(
        f"bench: {len(cases)} case(s) on {info['device_kind']} ({info['platform']}), "
        f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}"
    )
    results = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.name} ...")
        try:
            results.append(
                time_case(
                    case,
                    repeats=repeats,
                    min_time=min_time,
                    budget=budget,
                    sync=sync,
                    max_steps=max_steps,
                    workers=workers,
                    method=method,
                    unroll=unroll,
                    log=log,
                )
            )
        except Exception as e:  # one broken case must not lose the others
            log(f"  FAILED: {type(e).__name__}: {e}")
            results.append(
                {"name": case.name, "family": case.family, "error": f"{type(e).__name__}: {e}"}
            )
        if on_case is not None:
            part = _results(info, settings, results, t0)
            part["partial"] = i < len(cases)
            on_case(part)
    out = _results(info, settings, results, t0)
    if any(c.family == "batch_norm" for c in cases):  # flax's fast variance, kept in view
        out["accuracy"] = large_mean_accuracy()
        log("\n".join(render_accuracy(out["accuracy"])))
    return out


def large_mean_accuracy(shape=(4096, 8), mean=1e4, std=1e-2) -> dict:
    """batch_norm's forward on float32 data with a large mean and a small spread, against
    float64: the max pointwise error of the normalized output and the worst ratio of the
    batch variance to float64's, for ours (one-pass shifted, two-pass) and flax's
    (``use_fast_variance`` True: E[x^2] - E[x]^2; False: two-pass). Deterministic: the
    same numbers on every run of the same machine."""
    import flax.linen as nn

    import jax_batchinhib as jb

    x64 = np.asarray(mean + std * jax.random.normal(jax.random.key(0), shape), np.float64)
    x32 = jnp.asarray(x64.astype(np.float32))
    xt = np.asarray(x32, np.float64)  # the float32 data, exactly, in float64
    mu = xt.mean(0)
    var = xt.var(0)
    y64 = (xt - mu) / np.sqrt(var + 1e-5)

    def flax_bn(fast):
        bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5, use_fast_variance=fast,
                          use_scale=False, use_bias=False, momentum=0.0)  # fmt: skip
        y, upd = bn.apply({"batch_stats": bn.init(jax.random.key(0), x32)["batch_stats"]}, x32,
                          mutable=["batch_stats"])  # fmt: skip
        # momentum 0: the running var after one step is the batch variance itself
        return y, np.asarray(upd["batch_stats"]["var"], np.float64)

    def ours(fast):
        y, st = jb.batch_norm(x32, use_fast_variance=fast, epsilon=1e-5)
        return y, np.asarray(st.var, np.float64)

    out = {"shape": list(shape), "mean": mean, "std": std, "float64_var": float(var.mean())}
    runs = {"ours": (ours, True), "ours_2pass": (ours, False), "flax": (flax_bn, True),
            "flax_2pass": (flax_bn, False)}  # fmt: skip
    for name, (f, fast) in runs.items():
        y, v = f(fast)
        r = v / var
        out[name] = {
            "max_abs_err_y": float(np.max(np.abs(np.asarray(y, np.float64) - y64))),
            "var_ratio_min": float(r.min()),
            "var_ratio_max": float(r.max()),
        }
    return out


def render_accuracy(acc: dict) -> list[str]:
    """The large-mean accuracy comparison as markdown."""
    out = [
        f"batch_norm forward in float32 on data with mean {acc['mean']:g} and std "
        f"{acc['std']:g} ({'x'.join(map(str, acc['shape']))}), against float64 of the same "
        "float32 data (target: ours within 1e-3 pointwise):",
        "",
        "| contender | max abs error of y | batch var / float64 var |",
        "| --- | --- | --- |",
    ]
    for k in ("ours", "ours_2pass", "flax", "flax_2pass"):
        a = acc[k]
        out.append(
            f"| {k} | {a['max_abs_err_y']:.2g} | {a['var_ratio_min']:.6g} to "
            f"{a['var_ratio_max']:.6g} |"
        )
    return out + [""]


def _results(info, settings, results, t0) -> dict:
    out = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "settings": settings,
        "cases": list(results),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out["targets"] = check_targets(out)
    return out


def merge_runs(runs: Sequence[dict]) -> dict:
    """One results dict from several whole runs of the same cases (``--runs K``).

    On a shared machine a ratio moves between runs a few minutes apart by more than the
    rounds of one run show (the 2-core CPU: batch_norm's ours/flax at (4096, 512) read
    0.98 and 0.64 in two runs twenty minutes apart). Each case's figure is then the
    median over the runs: of each contender's median time, and of each ratio (the run's
    ``median(ours) / median(theirs)``), with every run's ratio kept in ``time_runs``;
    ``time_round_min`` / ``time_round_max`` span every round of every run. The hardware
    limit's rates come from the merged median times of ours and of the copy (or matmul),
    its fraction is their ratio. A case that failed in any run keeps
    that run's error. Memory figures (deterministic) are the first run's.
    """
    if not runs:
        raise ValueError("bench.merge_runs: runs must be a non-empty list of results dicts")
    names = [[c["name"] for c in r["cases"]] for r in runs]
    if any(n != names[0] for n in names):
        raise ValueError(
            f"bench.merge_runs: every run must time the same cases in the same order; got "
            f"{names[0]} and {next(n for n in names if n != names[0])}"
        )
    if len(runs) == 1:
        return runs[0]
    out = json.loads(json.dumps(runs[0], default=_json_default))
    out["runs"] = len(runs)
    out["run_dates"] = [r["date"] for r in runs]
    out["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    out["settings"]["runs"] = len(runs)
    out["settings"]["statistic"] = (
        "per run: median over rounds of timing / (calls * K), ratio = median(ours) / "
        f"median(theirs); over the {len(runs)} runs: the median of each"
    )
    for i, case in enumerate(out["cases"]):
        per_run = [r["cases"][i] for r in runs]
        failed = next((c for c in per_run if "error" in c), None)
        if failed is not None:
            out["cases"][i] = {k: failed[k] for k in ("name", "family", "error")}
            continue
        for name, info in case["contenders"].items():
            ms = [c["contenders"][name]["median_s"] for c in per_run]
            info["median_s"] = statistics.median(ms)
            info["median_s_runs"] = ms
            info["min_s"] = min(c["contenders"][name]["min_s"] for c in per_run)
            info["times_s"] = [t for c in per_run for t in c["contenders"][name]["times_s"]]
        for pair, r in case["ratios"].items():
            rs = [c["ratios"][pair] for c in per_run]
            r["time"] = statistics.median(x["time"] for x in rs)
            r["time_runs"] = [x["time"] for x in rs]
            r["time_round_min"] = min(x["time_round_min"] for x in rs)
            r["time_round_max"] = max(x["time_round_max"] for x in rs)
        if case.get("limit"):  # from the merged medians, so it agrees with the time column
            case["limit"] = _limit_from(case["limit"], case["contenders"])
        case["rounds"] = sum(c["rounds"] for c in per_run)
    out["targets"] = check_targets(out)
    return out


def check_targets(results: dict) -> list[dict]:
    """Where each of :data:`TARGETS` stands in ``results``."""
    rows = []
    cases = [c for c in results["cases"] if "error" not in c]
    for family, metric, op, value, where in TARGETS:
        fam = [c for c in cases if c["family"] == family]
        if family == "batch_norm" and metric == "copy_fraction":
            if fam:
                big = max(
                    fam, key=lambda c: math.prod(c["shape"]) * (4 if "32" in c["dtype"] else 2)
                )
                fam = [c for c in fam if math.prod(c["shape"]) == math.prod(big["shape"])]
        if family == "batch_inhib" and metric == "matmul_fraction":
            fam = [c for c in fam if c["shape"] == [1024, 512]]
        got = []
        for c in fam:
            v = _metric(c, metric)
            if v is not None:
                got.append((c["name"], v))
        if not got:
            rows.append(
                {
                    "family": family,
                    "metric": metric,
                    "target": f"{op} {value}",
                    "where": where,
                    "status": "not measured",
                    "values": {},
                }
            )
            continue
        ok = all((v <= value) if op == "<=" else (v >= value) for _, v in got)
        if where == "every shape":  # of this run: a --cases subset must not read as all
            where = f"every shape run ({len(got)})"
        rows.append(
            {
                "family": family,
                "metric": metric,
                "target": f"{op} {value}",
                "where": where,
                "status": "met" if ok else "missed",
                "values": dict(got),
            }
        )
    return rows


def _metric(c, metric):
    if metric.startswith("ours/"):
        r = c["ratios"].get(metric)
        return None if r is None else r["time"]
    if metric in ("copy_fraction", "matmul_fraction"):
        return None if not c.get("limit") else c["limit"]["fraction"]
    if metric.startswith(("resid_ratio_", "temp_ratio_")):
        kind, _, other = metric.split("_", 2)
        r = c["ratios"].get(f"ours/{other}")
        return None if r is None else r.get(kind)
    return None


# --------------------------------------------------------------------------- markdown


def render_markdown(
    results_list: Sequence[dict],
    notes: str | None = None,
    memory: Sequence[dict] = (),
    scaling_list: Sequence[tuple[dict, str | None]] = (),
    preamble: str | None = None,
) -> str:
    """BENCHMARKS.md from any number of results dicts (one section per machine), the
    train-step memory and scaling results (with their plot's path), and the notes."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run.py` (`jax_batchinhib.apps.bench`); do not edit by "
        "hand: the notes at the end come from `benchmarks/notes.md`.",
        "",
        "Each step is a jitted forward+backward (`value_and_grad` of `sum(y * ct)` with a "
        "fixed random cotangent, `y` returned), contenders timed interleaved in one run; "
        "times are per step, medians over rounds, **ratios are ours / theirs** (below 1: ours is "
        "faster or keeps less). *kept* = bytes of the residuals the backward keeps (leaves "
        "of the function `jax.vjp` returns); *temp* = XLA temp buffer of the compiled step.",
        "",
        "Method *loop* (accelerators): K steps run inside one compiled `lax.fori_loop` "
        "(unrolled up to 8 steps an iteration), each step's large inputs offset by "
        "`1e-30 x` the previous step's first output so that XLA cannot hoist or merge steps, "
        "every step's outputs kept; K is chosen so one call runs at least a timing's length "
        "(each section gives it: `--min-time`, 20 ms by default), or several calls back to "
        "back make a timing that long; per-step time = timing / steps. Method "
        "*calls* (CPU): one dispatch per step, several per timing; on a CPU a dispatch "
        "costs microseconds against steps of milliseconds.",
        "",
    ]
    if preamble:
        lines += [preamble.strip(), ""]
    for res in results_list:
        lines += _render_one(res)
    for mem in memory:
        m = mem["machine"]
        lines += [
            f"## Train-step memory ({m['platform'].upper()}, XLA memory analysis)",
            "",
            "`jax.jit(step).lower(...).compile().memory_analysis()` of an optax SGD+momentum "
            "train step (softmax cross-entropy, running statistics updated); *temp* is XLA's "
            "temporary buffers (activations kept for the backward and scratch), *peak* "
            "XLA's peak estimate. Generated by `python benchmarks/run.py --memory`.",
            "",
            *render_memory(mem["models"]),
            "",
        ]
    for sc, image in scaling_list:
        m = sc["machine"]
        fx = sc["fixed"]
        lines += [
            f"## Scaling curves ({m['platform'].upper()})",
            "",
            f"Forward+backward step time (median of interleaved rounds) and kept bytes "
            f"against rows m at N = {fx['n']} and against features N at m = {fx['m']}; "
            "slopes are least-squares fits of log(y) on log(m) or log(N) (1: linear, 2: "
            "quadratic). Generated by `python benchmarks/run.py --scaling`.",
            "",
            *render_scaling(sc, image),
            "",
        ]
    if notes:
        lines += ["", notes.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _render_one(res: dict) -> list[str]:
    m = res["machine"]
    s = res["settings"]
    out = [
        f"## {m['platform'].upper()}: {m['cpu'] if m['platform'] == 'cpu' else m['device_kind']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; device `{m['device_kind']}` "
        f"({m['platform']}, {m['device_count']} device(s)); jax {m['jax']}, jaxlib "
        f"{m['jaxlib']}, flax {m.get('flax')}, optax {m.get('optax')}, Python {m['python']}. "
        + (
            f"{res['runs']} whole runs ({', '.join(res['run_dates'])}), {res['wall_s']:.0f} s; "
            "each figure is the median over the runs, with the runs' range in brackets; "
            if res.get("runs")
            else f"Run {res['date']}, {res['wall_s']:.0f} s; "
        )
        + f"up to {s['repeats']} rounds per case, "
        f"one timing >= {s['min_time_s'] * 1e3:.0f} ms, sync={s['sync']}, "
        f"method={s.get('method', 'calls')}"
        + (f", XLA_FLAGS=`{m['xla_flags']}`" if m.get("xla_flags") else "")
        + ".",
        "",
        *([f"**{res['label']}**", ""] if res.get("label") else []),
        "| case | ours | autodiff | flax / optax | ours/autodiff | ours/flax, ours/optax | "
        "kept: ours / autodiff / others | temp: ours / autodiff / others | hardware limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in res["cases"]:
        if "error" in c:
            out.append(f"| {c['name']} | error: {c['error']} | | | | | | | |")
            continue
        cs = c["contenders"]
        others = [
            k for k, v in cs.items() if k not in ("ours", "autodiff") and v["role"] == "contender"
        ]
        o = cs.get("ours", {})
        a = cs.get("autodiff", {})

        def ratio(pair, key="time", c=c):
            r = c["ratios"].get(pair)
            if not r or r.get(key) is None:
                return "-"
            runs = r.get(f"{key}_runs")
            spread = f" ({min(runs):.2f}-{max(runs):.2f})" if runs else ""
            return f"**{r[key]:.2f}**{spread}"

        trio = [d for d in (o, a, *(cs[k] for k in others)) if d]
        kept = " / ".join(_fmt_b(d.get("resid_bytes")) for d in trio)
        temp = " / ".join(_fmt_b(d.get("temp_bytes")) for d in trio)
        kr = c["ratios"].get("ours/autodiff", {}).get("resid")
        if kr is not None:
            kept += f" ({kr:.2f}x)"
        other_t = "<br>".join(f"{k} {_fmt_t(cs[k].get('median_s'))}" for k in others) or "-"
        other_r = "<br>".join(f"{k} {ratio('ours/' + k)}" for k in others) or "-"
        lim = c.get("limit")
        if lim and lim["kind"] == "bandwidth":
            ls = (
                f"{lim['ours_GBps']:.1f} GB/s = {100 * lim['fraction']:.0f}% of copy "
                f"{lim['copy_GBps']:.1f} GB/s"
            )
        elif lim:
            ls = (
                f"{lim['ours_GFLOPps']:.1f} GFLOP/s = {100 * lim['fraction']:.0f}% of matmul "
                f"{lim['matmul_GFLOPps']:.1f}"
            )
        else:
            ls = "-"
        name = c["name"] + (f" ({c['note']})" if c.get("note") else "")
        out.append(
            f"| {name} | {_fmt_t(o.get('median_s'))} | {_fmt_t(a.get('median_s'))} | "
            f"{other_t} | {ratio('ours/autodiff')} | {other_r} | {kept} | {temp} | {ls} |"
        )
    out.append("")
    if res.get("accuracy"):
        out += render_accuracy(res["accuracy"])
    out += [
        "Byte counts: batch_norm moves at least `read x, dy; write y, dx` = 4 x size x "
        "itemsize, against `copy` = `(x + 1, dy + 1)` of the same arrays timed in the same "
        "rounds. batch_inhib does 10 M N n flops in matmuls (n = N / groups), against one "
        "`(M, n) @ (n, n)` per group at HIGHEST precision (2 M N n flops), same rounds.",
        "",
        "Targets:",
        "",
        "| family | metric | target | where | status | values |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in check_targets(res):  # today's targets, also for an earlier run's results
        vals = ", ".join(f"{k.split('/', 1)[1]}: {v:.2f}" for k, v in t["values"].items())
        out.append(
            f"| {t['family']} | {t['metric']} | {t['target']} | {t['where']} | "
            f"{t['status']} | {vals} |"
        )
    out.append("")
    return out


def headline_table(res: dict) -> str:
    """A short markdown table of the time ratios (for the README / a report)."""
    lines = ["| case | ours/autodiff | ours/flax or optax |", "| --- | --- | --- |"]
    for c in res["cases"]:
        if "error" in c:
            continue
        r = c["ratios"]
        a = r.get("ours/autodiff", {}).get("time")
        o = next((v["time"] for k, v in r.items() if k in ("ours/flax", "ours/optax")), None)
        lines.append(
            f"| {c['name']} | {'-' if a is None else f'{a:.2f}'} | "
            f"{'-' if o is None else f'{o:.2f}'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def build_parser(prog="jax-batchinhib bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time the hand-derived VJPs against autodiff of the reference and flax/optax "
        "(forward+backward, interleaved, medians), with memory and hardware-limit figures.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_true",
        help="a small subset, ~1 minute on 2 CPU cores (the default); with --cases, the "
        "named cases with the quick timing defaults (7 rounds, 5 ms timings, 4 s a case)",
    )
    g.add_argument(
        "--full",
        action="store_true",
        help="every case; with --cases, the named cases with the full timing defaults "
        "(21 rounds, 20 ms timings, 12 s a case)",
    )
    p.add_argument(
        "--cases", nargs="+", metavar="NAME", help="case names or glob patterns ('batch_norm/*')"
    )
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="rounds per case, >= 3: the timings are medians of them (default 7 quick, 21 "
        "full; fewer when --case-budget runs out, never below 3); with --scaling, rounds "
        "per point, >= 1 (default 5)",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="seconds per timing, > 0 (default 0.005 quick, 0.02 full)",
    )
    p.add_argument(
        "--case-budget",
        type=float,
        default=None,
        help="timing seconds per case, > 0; at least 3 rounds run whatever it is (default "
        "4 quick, 12 full)",
    )
    p.add_argument(
        "--sync",
        choices=("auto", "each", "batch"),
        default="auto",
        help="block on each call (CPU) or on the last of a timing (accelerators)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=1000,
        help="most steps K run inside one compiled call (default 1000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads compiling a case's contenders at once (default 1 on CPU; otherwise a "
        "quarter of the CPU cores, from 1 to 4)",
    )
    p.add_argument(
        "--method",
        choices=("auto", "loop", "calls"),
        default="auto",
        help="loop: K steps inside one compiled lax.fori_loop per call (default on "
        "accelerators); calls: one dispatch per step (default on CPU)",
    )
    p.add_argument(
        "--unroll",
        type=int,
        default=8,
        help="with the loop: most steps chained in one loop iteration (default 8)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="time every case this many whole runs over and report the median over runs, "
        "with each run's ratio (for a shared machine, where ratios move between runs; "
        "default 1)",
    )
    p.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the large shapes (default: on an accelerator only); --no-large also drops "
        "them from the --cases patterns",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead of the cases: XLA's memory analysis of compiled train steps (the "
        "example CNN, an MLP with BatchInhib) with our layers, autodiff and flax's",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="instead of the cases: time and kept bytes against m and N (log-log slopes)",
    )
    p.add_argument("--plot", metavar="PATH", help="with --scaling: write the plot (PNG)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the results as markdown")
    return p


def timing_settings(args: argparse.Namespace) -> dict:
    """The mode (``--quick``, the default, or ``--full``) and its timing defaults, each
    replaced by ``--repeats`` / ``--min-time`` / ``--case-budget`` when given."""
    mode = "full" if args.full else "quick"  # --quick and neither: the quick mode
    dflt = {"quick": (7, 0.005, 4.0), "full": (21, 0.02, 12.0)}[mode]
    return {
        "mode": mode,
        "repeats": args.repeats or dflt[0],
        "min_time": args.min_time or dflt[1],
        "budget": args.case_budget or dflt[2],
    }


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem with parsed ``jax-batchinhib bench`` arguments, as argparse
    words it (``"argument --repeats: must be >= 1; got 0"``), or None. The output files
    (``--json``, ``--markdown``, ``--plot``) are checked last, without creating anything:
    each must be a file in a folder that exists or can be created, and can be written."""
    from jax_batchinhib.apps.cli import output_file_problem

    for flag in ("repeats", "max_steps", "workers", "unroll", "runs"):
        val = getattr(args, flag)
        if val is not None and val < 1:
            return f"argument --{flag.replace('_', '-')}: must be >= 1; got {val}"
    for flag in ("min_time", "case_budget"):
        val = getattr(args, flag)
        if val is not None and not (math.isfinite(val) and val > 0):
            return (
                f"argument --{flag.replace('_', '-')}: must be a positive number of seconds; "
                f"got {val}"
            )
    if args.repeats is not None and args.repeats < 3 and not (args.scaling or args.memory):
        return (
            f"argument --repeats: at least 3 rounds per case (each timing is their median); "
            f"got {args.repeats}"
        )
    if args.plot is not None and not args.scaling:
        return f"argument --plot: applies with --scaling only (the scaling plot); got {args.plot!r}"
    if args.memory and args.scaling:
        return "argument --scaling: not allowed with --memory (one mode a run)"
    mode = next((f"--{m}" for m in ("memory", "scaling", "list") if getattr(args, m)), None)
    if mode:
        given = [f for f in ("full", "cases", "markdown") if getattr(args, f)]
        given += ["runs"] if args.runs != 1 else []
        given += [f for f in ("min_time", "case_budget") if getattr(args, f) is not None]
        if mode == "--list" and args.json is not None:
            given.append("json")
        if given:
            flag = "--" + given[0].replace("_", "-")
            return f"argument {flag}: does not apply to {mode}; got it with {mode}"
    paths = {}
    for flag in ("json", "markdown", "plot"):
        path = getattr(args, flag)
        if path is not None:
            if not path.strip():
                return f"argument --{flag}: expected a file path; got {path!r}"
            real = os.path.realpath(path)
            if real in paths:
                return f"argument --{flag}: the same file as --{paths[real]}; got {path!r}"
            paths[real] = flag
    for flag in ("json", "markdown", "plot"):
        path = getattr(args, flag)
        if path is not None:
            problem = output_file_problem(path)
            if problem:
                return f"argument --{flag}: {problem}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``jax-batchinhib bench [--quick | --full] [--cases ...] [--json P] [--markdown P]``.
    A bad option exits with status 2 (argparse's usage error) before anything runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cases = None
    if not (args.list or args.memory or args.scaling):
        try:  # --quick, or neither: the quick mode (timing_settings)
            cases = select_cases(args.cases, quick=not args.full, large=args.large)
        except ValueError as e:
            parser.error(f"argument --cases: {e}")
    problem = check_args(args)
    if problem:
        parser.error(problem)
    if args.list:
        small = {c.name for c in all_cases(large=False)}
        for c in all_cases(large=True):
            tag = "  (quick)" if c.name in QUICK else "" if c.name in small else "  (large)"
            print(c.name + tag)
        return 0
    if args.memory:
        mem = {"machine": machine_info(), "models": train_step_memory()}
        print("\n".join(render_memory(mem["models"])))
        if args.json:
            write_json(mem, args.json)
        return 0
    if args.scaling:
        sc = scaling(repeats=args.repeats or 5)
        sc["machine"] = machine_info()
        if args.plot:
            plot_scaling(sc, args.plot)
        print("\n".join(render_scaling(sc, args.plot)))
        if args.json:
            write_json(sc, args.json)
        return 0
    timing = timing_settings(args)
    done: list[dict] = []

    def save(part):
        # an interrupted run keeps what it measured: the runs done, or this run's cases
        if args.json:
            write_json(merge_runs(done) if done else part, args.json)

    for i in range(args.runs):
        if args.runs > 1:
            print(f"run {i + 1} of {args.runs}")
        done.append(
            run(
                cases,
                repeats=timing["repeats"],
                min_time=timing["min_time"],
                budget=timing["budget"],
                sync=args.sync,
                max_steps=args.max_steps,
                workers=args.workers,
                method=args.method,
                unroll=args.unroll,
                on_case=save,
            )
        )
    res = merge_runs(done)
    print()
    print(headline_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        with _open_for_writing(args.markdown) as f:
            f.write(render_markdown([res]))
        print(f"wrote {args.markdown}")
    return 1 if any("error" in c for c in res["cases"]) else 0


def _make_parent(path: str) -> None:
    """Create the folders on the way to the output file ``path`` (checked beforehand by
    :func:`check_args`, which creates nothing)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)


def _open_for_writing(path: str):
    """``open(path, "w")``, its folders created first."""
    _make_parent(path)
    return open(path, "w")


def write_json(res: dict, path: str) -> None:
    with _open_for_writing(path) as f:
        json.dump(res, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


# ------------------------------------------------------------------ whitening (iter_norm, zca)


def whitening_cases(shapes=(((1024, 512), 1), ((1024, 512), 16))) -> list[Case]:
    """iter_norm (T=5) and zca_norm against autodiff of their references: fwd+bwd time
    and kept bytes at each ``((M, N), groups)`` (part of :func:`all_cases`)."""
    import jax_batchinhib as jb
    from jax_batchinhib import reference as ref

    out = []
    for (m, nf), groups in shapes:
        for name, op, rf in (
            ("iter_norm", jb.iter_norm, ref.iter_norm),
            ("zca_norm", jb.zca_norm, ref.zca_norm),
        ):

            def build(m=m, nf=nf, groups=groups, op=op, rf=rf):
                k = _keys(4, 2)
                mix = jax.random.normal(k[3], (nf, nf), jnp.float32) / math.sqrt(nf)
                x = jax.random.normal(k[0], (m, nf), jnp.float32)
                x = x + 0.5 * x @ mix  # correlated features
                scale = 1 + 0.1 * jax.random.normal(k[1], (nf,), jnp.float32)
                ct = jax.random.normal(k[2], (m, nf), jnp.float32)
                fwds = {
                    "ours": lambda x, s: op(x, s, groups=groups)[0],
                    "autodiff": _highest(lambda x, s: rf(x, s, groups=groups)[0]),
                }
                return _contenders(fwds, (x, scale), (), ct)

            g = f"/g{groups}" if groups > 1 else ""
            out.append(
                Case(
                    f"{name}/{m}x{nf}{g}/float32",
                    name,
                    (m, nf),
                    "float32",
                    build,
                    note=f"groups={groups}" if groups > 1 else "",
                )
            )
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
