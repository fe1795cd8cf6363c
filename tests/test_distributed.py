"""Data parallelism with 8 CPU devices (tests/conftest.py splits the host into 8).

What is shown, each against the single-device computation on the full batch:

- batch_norm, batch_center, batch_inhib (groups 1 and 2) under ``jax.shard_map`` with
  ``axis_name``, with ``check_vma`` on and off: outputs, statistics and the gradients of
  x and of the parameters equal the full batch on one device, and equal autodiff of the
  reference run under the same shard_map;
- the same under ``jax.vmap`` with ``axis_name`` (with and without jit), and with a
  tuple ``axis_name`` across two nested vmaps; with x shared by the members of the
  vmapped ``axis_name`` (and parameters per member), and under a plain vmap over the
  parameters with x shared, the gradients equal the reference's;
- the same under ``jax.jit`` with the batch sharded over 8 devices and no axis_name;
- masks with uneven valid rows per device (one device with none): the statistics are those
  of the valid rows gathered on one device;
- ``axis_index_groups`` (pmap, shard_map without vma checks) and its shard_map
  replacement, a 2-D mesh;
- errors: an axis_name that names no mapped axis, groups where JAX refuses them;
- ghost batches (``virtual_batch_size``) equal one call per sub-batch; a sub-batch with no
  valid value (on any device) is left out of the statistics' average;
- training: a model trained for several steps on 8 devices (GSPMD and shard_map) holds
  the parameters and batch_stats of the single-device run; the running statistics are
  bitwise identical on every device.

Tolerances: float64 tests use rtol=1e-10, atol=1e-12 (float64 round-off of sums over 32
rows in a different order is ~1e-15 relative). Training tests run in float32 (the models'
dtype) for 3 SGD steps: the single- and 8-device runs differ only in the order of float32
additions (~1e-7 relative per sum), so rtol=2e-5, atol=1e-6.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_batchinhib as jb
from jax_batchinhib import linen as bl
from jax_batchinhib import parallel, running
from jax_batchinhib import reference as ref
from jax_batchinhib.apps import train
from jax_batchinhib.apps.models import MLP

ND = 8
B, N = 32, 4  # 4 rows per device
RTOL, ATOL = 1e-10, 1e-12  # float64 round-off
RTOL32, ATOL32 = 2e-5, 1e-6  # float32 round-off after 3 steps

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < ND, reason="needs 8 devices (tests/conftest.py sets them up)"
)


@functools.cache
def mesh():
    return parallel.make_mesh(ND)


def close(a, b, rtol=RTOL, atol=ATOL):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ the ops and losses

OPS = ["batch_norm", "batch_center", "batch_inhib", "batch_inhib_groups2"]


def call(name, mod, x, p, **kw):
    """(y, stats) of op ``name`` from module ``mod`` (jb or reference)."""
    if name == "batch_norm":
        return mod.batch_norm(x, p["scale"], p["bias"], **kw)
    if name == "batch_center":
        return mod.batch_center(x, p["bias"], **kw)
    if name in ("iter_norm", "zca_norm"):  # statistics stop-gradient: y alone is used
        return getattr(mod, name)(x, p["scale"], p["bias"], groups=2, **kw)
    groups = 2 if name == "batch_inhib_groups2" else 1
    return mod.batch_inhib(x, p[f"alpha{groups}"], groups=groups, **kw)


def params():
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "scale": 1.0 + 0.3 * jax.random.normal(k[0], (N,), jnp.float64),
        "bias": 0.5 * jax.random.normal(k[1], (N,), jnp.float64),
        "alpha1": 0.5 * jax.random.normal(k[2], (N, N), jnp.float64),
        "alpha2": 0.5 * jax.random.normal(k[2], (2, N // 2, N // 2), jnp.float64),
    }


def data():
    kx, kc = jax.random.split(jax.random.key(0))
    # features correlated and off-centre, so every term of every rule matters
    x = jax.random.normal(kx, (B, N), jnp.float64) @ jnp.array(
        [[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, 0.4, 0.0], [0.3, 0.0, 1.0, 0.5], [0.0, 0.2, 0.0, 1.0]]
    ) + jnp.array([2.0, -1.0, 0.5, 3.0])
    ct = jax.random.normal(kc, (B, N), jnp.float64)
    return x, ct


def loss(name, mod, x, p, ct, n_share=1, **kw):
    """A loss using y and (for batch_norm/center) the statistics, which are outputs with
    gradients. Under shard_map the per-device losses add up to the global loss, so the
    statistics' term (the same on every device) is counted ``1/n_share`` on each."""
    y, st = call(name, mod, x, p, **kw)
    out = jnp.sum(y * ct)
    if name == "batch_norm":
        out = out + (jnp.sum(jnp.sin(st.mean)) + jnp.sum(jnp.cos(st.var))) / n_share
    if name == "batch_center":
        out = out + jnp.sum(jnp.sin(st.mean)) / n_share
    return out, (y, st)


def full_batch(name, mask=None):
    """Single device, whole batch: (y, stats, dx, dparams)."""
    x, ct = data()
    p = params()

    @jax.jit
    def f(x, p, ct, mask):
        g = jax.grad(loss, argnums=(2, 3), has_aux=True)
        (dx, dp), (y, st) = g(name, jb, x, p, ct, mask=mask)
        return y, st, dx, dp

    return f(x, p, ct, mask)


# ------------------------------------------------------------------- shard_map


@pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "no_vma"])
@pytest.mark.parametrize("name", OPS)
def test_shard_map_equals_full_batch(name, check_vma):
    """Outputs, statistics, dx and dparams under shard_map(axis_name) equal the
    single-device full batch, and autodiff of the reference under the same shard_map.

    With check_vma=True the gradients of the replicated parameters come out summed over
    the devices (typed invariant); with check_vma=False they are per-device parts, summed
    here with psum, as for autodiff of the reference."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        want = full_batch(name)

        def body(mod, x, p, ct):
            g = jax.grad(loss, argnums=(2, 3), has_aux=True)
            (dx, dp), (y, st) = g(name, mod, x, p, ct, n_share=ND, axis_name="data")
            if not check_vma:
                dp = lax.psum(dp, "data")
            return y, st, dx, dp

        outs = {}
        for label, mod in (("ops", jb), ("reference", ref)):
            f = jax.shard_map(
                functools.partial(body, mod),
                mesh=mesh(),
                in_specs=(P("data"), P(), P("data")),
                out_specs=(P("data"), P(), P("data"), P()),
                check_vma=check_vma,
            )
            outs[label] = jax.jit(f)(x, p, ct)
        close(outs["ops"], want)
        close(outs["reference"], want)
        close(outs["ops"], outs["reference"])


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", OPS)
def test_vmap_with_axis_name_equals_full_batch(name, jit):
    """``jax.vmap(..., axis_name=...)`` over 8 blocks of rows: the statistics, dx and
    dparams of the summed loss equal the single-device full batch, with and without jit.

    The gradient through the returned statistics is the case that needs care: a psum
    under vmap is unbatched, and its cotangent would arrive already summed over the
    members (before the fix, batch_norm's came out multiplied by 8, and without jit the
    backward raised ``NameError: unbound axis name``)."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        want = full_batch(name)
        xs, cts = x.reshape(ND, B // ND, N), ct.reshape(ND, B // ND, N)

        def total(x, p):
            def member(x, ct):
                return loss(name, jb, x, p, ct, n_share=ND, axis_name="rows")

            out, (y, st) = jax.vmap(member, axis_name="rows")(x, cts)
            return jnp.sum(out), (y, jax.tree.map(lambda s: s[0], st))

        g = jax.grad(total, argnums=(0, 1), has_aux=True)
        (dx, dp), (y, st) = (jax.jit(g) if jit else g)(xs, p)
        close((y.reshape(B, N), st, dx.reshape(B, N), dp), want)


@pytest.mark.parametrize(
    "where",
    [
        "inside",
        "around_shard_map",
        pytest.param(
            "outside",
            marks=pytest.mark.xfail(
                strict=True,
                raises=NameError,
                reason="JAX re-traces a custom_vjp's forward rule for jax.checkpoint after "
                "the vmap's axis name has left scope: NameError: unbound axis name (a "
                "custom_vjp with a collective in its forward; autodiff of the reference "
                "works). Put the checkpoint inside the vmap, or use shard_map.",
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", ["batch_norm", "batch_inhib"])
def test_checkpoint_and_vmap_with_axis_name(name, where):
    """``jax.checkpoint`` inside ``jax.vmap(..., axis_name=...)`` (each member's step
    rematerialized), and around a ``shard_map`` over 8 devices: dx and dparams equal the
    full batch. Around the vmap it fails in JAX (the strict xfail, so that a JAX that
    fixes it shows as XPASS); ``docs/scaling.md`` says so."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        want = full_batch(name)
        xs, cts = x.reshape(ND, B // ND, N), ct.reshape(ND, B // ND, N)

        def member(x, ct, p):
            return loss(name, jb, x, p, ct, n_share=ND, axis_name="rows")[0]

        def total(x, p):
            m = jax.checkpoint(member) if where == "inside" else member
            return jnp.sum(jax.vmap(m, in_axes=(0, 0, None), axis_name="rows")(x, cts, p))

        def total_sharded(x, p):
            def local(x, ct, p):
                return lax.psum(member(x, ct, p), "rows")

            specs = (P("rows"), P("rows"), P())
            f = jax.shard_map(
                local, mesh=parallel.make_mesh(ND, "rows"), in_specs=specs, out_specs=P()
            )
            return f(x, ct, p)

        if where == "around_shard_map":
            dx, dp = jax.jit(jax.grad(jax.checkpoint(total_sharded), argnums=(0, 1)))(x, p)
        else:
            f = total if where == "inside" else jax.checkpoint(total)
            dx, dp = jax.jit(jax.grad(f, argnums=(0, 1)))(xs, p)
        close((dx.reshape(B, N), dp), want[2:])


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("per_member", [False, True], ids=["shared_params", "member_params"])
@pytest.mark.parametrize("name", [*OPS, "iter_norm", "zca_norm"])
def test_vmap_with_axis_name_and_x_shared_equals_reference(name, per_member, jit):
    """``jax.vmap(..., axis_name=...)`` over 3 members that share x (unbatched), each with
    its own cotangent and, with ``member_params``, its own parameters (a scale that
    differs across the members of ``axis_name``): dx and the parameters' gradients of the
    summed loss, which uses the statistics, equal autodiff of the reference under the
    same vmap. Before, the first came out divided by 3 through the statistics (y and dx
    were unbatched, so vmap took one member's dx for the sum), the second wrong through
    y (the rule took the scale out of the psum over the members). With the parameters
    shared too, batch_inhib, iter_norm and zca_norm raised ``NameError: unbound axis
    name`` without jit: their y was unbatched, so the backward rule ran outside the vmap,
    where its psum has no axis (now y goes through ``Reduce.varying`` as batch_norm's)."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        if per_member:
            p = jax.tree.map(lambda v: jnp.stack([v, 0.5 * v + 0.1, -v]), p)
        cts = jnp.stack([ct, -0.5 * ct, 2.0 * ct])

        def total(mod, x, p):
            def member(p, ct):
                return loss(name, mod, x, p, ct, n_share=3, axis_name="members")[0]

            in_axes = (0 if per_member else None, 0)
            return jnp.sum(jax.vmap(member, in_axes=in_axes, axis_name="members")(p, cts))

        wrap = jax.jit if jit else (lambda f: f)
        got, want = (
            wrap(jax.grad(functools.partial(total, mod), argnums=(0, 1)))(x, p) for mod in (jb, ref)
        )
        close(got, want)


@pytest.mark.parametrize("name", OPS)
def test_tuple_axis_name_over_nested_vmaps_equals_full_batch(name):
    """A tuple ``axis_name`` across two nested vmaps (2 x 4 blocks of rows), eager: equal
    to the full batch. The backward rule is batched one vmap at a time, where the inner
    name is not bound: whether the axis is typed is decided in the forward (before, the
    backward asked ``axis_index`` and raised ``NameError: unbound axis name``)."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        want = full_batch(name)
        shape = (2, ND // 2, B // ND, N)
        xs, cts = x.reshape(shape), ct.reshape(shape)

        def total(x, p):
            def member(x, ct):
                return loss(name, jb, x, p, ct, n_share=ND, axis_name=("outer", "inner"))

            inner = jax.vmap(member, axis_name="inner")
            out, (y, st) = jax.vmap(inner, axis_name="outer")(x, cts)
            return jnp.sum(out), (y, jax.tree.map(lambda s: s[0, 0], st))

        (dx, dp), (y, st) = jax.grad(total, argnums=(0, 1), has_aux=True)(xs, p)
        close((y.reshape(B, N), st, dx.reshape(B, N), dp), want)


@pytest.mark.parametrize("name", OPS)
def test_vmap_over_parameters_with_shared_x_equals_reference(name):
    """``jax.vmap`` over 3 sets of parameters with x shared (unbatched): dx and the
    parameters' gradients of the summed loss, which uses the statistics, equal autodiff
    of the reference. The statistics depend on x alone, so JAX's vmap of a custom rule
    would leave them unbatched and hand each member the cotangent already summed over the
    members, while the rule is batched by the parameters: dx through the statistics came
    out multiplied by 3 before the ops made the statistics batched like the parameters."""
    with jax.enable_x64(True):
        x, ct = data()
        ps = jax.tree.map(
            lambda v: jnp.stack([v, 0.5 * v + 0.1, -v]), params()
        )  # three different members

        def total(mod, x, ps):
            out, _ = jax.vmap(lambda p: loss(name, mod, x, p, ct))(ps)
            return jnp.sum(out)

        got, want = (
            jax.jit(jax.grad(functools.partial(total, mod), argnums=(0, 1)))(x, ps)
            for mod in (jb, ref)
        )
        close(got, want)


def test_shard_map_parameter_gradients_per_device_without_vma():
    """check_vma=False: dscale/dbias per device are the sums over that device's rows
    (their psum is the full-batch gradient, shown above); the same as the reference."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()

        def body(mod, x, p, ct):
            g = jax.grad(lambda p: loss("batch_norm", mod, x, p, ct, axis_name="data")[0])
            return g(p)

        got = {}
        for label, mod in (("ops", jb), ("reference", ref)):
            f = jax.shard_map(
                functools.partial(body, mod),
                mesh=mesh(),
                in_specs=(P("data"), P(), P("data")),
                out_specs=P("data"),  # each device's own cotangent, stacked
                check_vma=False,
            )
            got[label] = jax.jit(lambda x, p, ct, f=f: f(x, p, ct))(x, p, ct)
        close(got["ops"]["scale"], got["reference"]["scale"])
        close(got["ops"]["bias"], got["reference"]["bias"])
        # the bias gradient of device d is the column sum of its own rows of ct
        per_dev = np.asarray(ct).reshape(ND, B // ND, N).sum(1).reshape(-1)
        np.testing.assert_allclose(np.asarray(got["ops"]["bias"]), per_dev, rtol=RTOL, atol=ATOL)


INFERENCE_FORMS = {
    "batch_norm_inference": lambda m, x, v: m.batch_norm_inference(x, v, v, v, v + 1),
    "batch_center_inference": lambda m, x, v: m.batch_center_inference(x, v, v),
    "batch_inhib_inference": lambda m, x, v: m.batch_inhib_inference(x, jnp.outer(v, v), jnp.diag(v + 1)),  # noqa: E501
    "iter_norm_inference": lambda m, x, v: m.iter_norm_inference(x, v, v, v, jnp.diag(v)),
    "zca_norm_inference": lambda m, x, v: m.zca_norm_inference(x, v, v, v, jnp.diag(v)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(INFERENCE_FORMS))
def test_shard_map_inference_forms_with_replicated_parameters(name):
    """Typed shard_map (check_vma=True), x split over the devices, the parameters and
    statistics replicated: their cotangents are summed over the devices, as autodiff of
    the reference gives. The rules returned each device's own part, which JAX refused
    ("Custom VJP bwd rule must produce an output with the same type")."""
    f = INFERENCE_FORMS[name]
    with jax.enable_x64(True):
        x, ct = data()
        v = jnp.linspace(0.5, 1.5, N, dtype=jnp.float64)
        got = {}
        for label, mod in (("ops", jb), ("reference", ref)):

            def body(v, x, ct, mod=mod):
                g = jax.grad(lambda v: lax.psum(jnp.sum(f(mod, x, v) * ct), "data"))
                return g(v)

            sm = jax.shard_map(
                body, mesh=mesh(), in_specs=(P(), P("data"), P("data")), out_specs=P()
            )
            got[label] = jax.jit(sm)(v, x, ct)
        close(got["ops"], got["reference"])


# ----------------------------------------------------------------------- GSPMD


@pytest.mark.parametrize("name", OPS)
def test_jit_sharded_batch_equals_full_batch(name):
    """jit over a batch split over 8 devices, no axis_name: XLA partitions the statistics
    sums (all-reduce in the compiled program) and every result equals one device's."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        want = full_batch(name)
        bat = parallel.batch_sharding(mesh())
        xs, cts = jax.device_put(x, bat), jax.device_put(ct, bat)
        ps = parallel.replicate(p, mesh())
        assert len(xs.sharding.device_set) == ND

        def f(x, p, ct):
            (dx, dp), (y, st) = jax.grad(loss, argnums=(2, 3), has_aux=True)(name, jb, x, p, ct)
            return y, st, dx, dp

        jf = jax.jit(f)
        hlo = jf.lower(xs, ps, cts).compile().as_text()
        assert "all-reduce" in hlo  # the sums really cross devices
        got = jf(xs, ps, cts)
        assert got[2].sharding.is_equivalent_to(NamedSharding(mesh(), P("data")), 2)
        close(got, want)


# ----------------------------------------------------------------------- masks

# valid rows per device (4 rows each): uneven, one device with none
COUNTS = np.array([4, 3, 1, 0, 2, 4, 1, 3])


def uneven_mask():
    return jnp.asarray((np.arange(B // ND)[None, :] < COUNTS[:, None]).reshape(B))


@pytest.mark.parametrize("name", ["batch_norm", "batch_inhib_groups2"])
def test_uneven_masks_give_global_statistics(name):
    """Each device holds a different number of valid rows: the statistics are those of
    the valid rows gathered on one device (counts summed, never an average of per-device
    means), and y and the gradients equal the
    single-device masked batch."""
    with jax.enable_x64(True):
        x, ct = data()
        p = params()
        mask = uneven_mask()
        valid = np.asarray(mask)
        # statistics of the valid rows alone, on one device, no mask
        y_valid, st_valid = jax.jit(lambda x, p: call(name, jb, x, p))(x[valid], p)
        # the naive per-device average of means is different here (the test can fail)
        xs = np.asarray(x).reshape(ND, B // ND, N)
        per_dev = [xs[d, : COUNTS[d]].mean(0) for d in range(ND) if COUNTS[d]]
        assert np.max(np.abs(np.mean(per_dev, 0) - np.asarray(st_valid.mean))) > 1e-2

        want = full_batch(name, mask)

        def body(x, p, ct, mask):
            g = jax.grad(loss, argnums=(2, 3), has_aux=True)
            (dx, dp), (y, st) = g(name, jb, x, p, ct, n_share=ND, axis_name="data", mask=mask)
            return y, st, dx, dp

        f = jax.shard_map(
            body,
            mesh=mesh(),
            in_specs=(P("data"), P(), P("data"), P("data")),
            out_specs=(P("data"), P(), P("data"), P()),
        )
        y, st, dx, dp = jax.jit(f)(x, p, ct, mask)
        close(st, st_valid)
        close(y[valid], y_valid)
        close((y, st, dx, dp), want)


# ------------------------------------------------------- axis_index_groups and errors


def _grouped_stats_want(x):
    """batch_norm statistics of devices 0-3 and of devices 4-7, each on one device."""
    half = B // 2
    return [jb.batch_norm(x[i * half : (i + 1) * half])[1] for i in range(2)]


def test_axis_index_groups_under_pmap_and_untyped_shard_map():
    """axis_index_groups=[[0..3],[4..7]]: statistics over each half of the devices.
    JAX supports it under pmap and shard_map(check_vma=False)."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    with jax.enable_x64(True):
        x, _ = data()
        want = _grouped_stats_want(x)

        def stats(x):
            return jb.batch_norm(x, axis_name="data", axis_index_groups=groups)[1]

        pm = jax.pmap(stats, axis_name="data")(x.reshape(ND, B // ND, N))
        sm = jax.jit(
            jax.shard_map(
                lambda x: jax.tree.map(lambda s: s[None], stats(x)),
                mesh=mesh(),
                in_specs=P("data"),
                out_specs=P("data"),
                check_vma=False,
            )
        )(x)
        for got in (pm, sm):
            for d in range(ND):
                close(jax.tree.map(lambda s, d=d: s[d], got), want[d // 4])


def test_axis_index_groups_typed_shard_map_error_and_2d_mesh():
    """shard_map with check_vma=True refuses axis_index_groups (JAX's psum does): the op
    says so and names the replacement, a 2-D mesh whose inner axis is the group."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    with jax.enable_x64(True):
        x, _ = data()
        f = jax.shard_map(
            lambda x: jb.batch_norm(x, axis_name="data", axis_index_groups=groups)[0],
            mesh=mesh(),
            in_specs=P("data"),
            out_specs=P("data"),
        )
        with pytest.raises(NotImplementedError, match=r"batch_norm: axis_index_groups.*mesh"):
            jax.jit(f)(x)

        mesh2 = jax.sharding.Mesh(np.asarray(jax.devices()[:ND]).reshape(2, 4), ("g", "d"))
        st = jax.jit(
            jax.shard_map(
                lambda x: jax.tree.map(lambda s: s[None], jb.batch_norm(x, axis_name="d")[1]),
                mesh=mesh2,
                in_specs=P(("g", "d")),
                out_specs=P("g"),
            )
        )(x)
        want = _grouped_stats_want(x)
        for i in range(2):
            close(jax.tree.map(lambda s, i=i: s[i], st), want[i])


@pytest.mark.parametrize(
    "groups, error",
    [
        ([[0, 1, 2, 3]], ValueError),  # covers half the devices: XLA's verifier aborted
        ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], ValueError),  # indices past the axis
        ([[0, 1, 2, 3, 4, 5, 6, 7], []], ValueError),  # an empty group
        ([[0, 1.0, 2, 3], [4, 5, 6, 7]], TypeError),  # not an integer index
        (8, TypeError),
    ],
)
@pytest.mark.parametrize("name", ["batch_norm", "batch_inhib", "zca_norm"])
def test_axis_index_groups_must_partition_the_axis(name, groups, error):
    """Groups that do not split the mapped axis's indices 0..7 into non-empty groups are a
    trace-time error naming the op, the argument, the axis size and the groups given (a
    partial cover used to pass JAX's check and stop in XLA's verifier)."""
    with jax.enable_x64(True):
        x, _ = data()
        p = params()
    kw = dict(axis_name="data", axis_index_groups=groups)
    f = jax.pmap(lambda x: call(name, jb, x, p, **kw)[0], axis_name="data")
    what = r"must split the 8 indices 0\.\.7" if error is ValueError else "must be a seq"
    with pytest.raises(error, match=rf"{name}: axis_index_groups {what}"):
        f(x.reshape(ND, B // ND, N))


def test_batch_count_checks_axis_index_groups():
    """The running statistics' count (what the modules psum beside the op) checks the
    groups as the ops do."""
    x = jnp.ones((ND, 4, N))
    f = jax.pmap(
        lambda x: running.batch_count("BatchNorm", x, axis_name="d", axis_index_groups=[[0]]),
        axis_name="d",
    )
    with pytest.raises(ValueError, match=r"BatchNorm: axis_index_groups must split the 8"):
        f(x)
    ok = jax.pmap(
        lambda x: running.batch_count(
            "BatchNorm", x, axis_name="d", axis_index_groups=[[0, 1, 2], [3, 4, 5, 6, 7]]
        ),
        axis_name="d",
    )(x)
    np.testing.assert_array_equal(ok[:, 0], [12.0] * 3 + [20.0] * 5)  # exact: small counts


@pytest.mark.parametrize("name", ["batch_norm", "batch_center", "batch_inhib"])
def test_axis_name_without_mapped_axis_is_a_clear_error(name):
    """axis_name naming no mapped axis: a NameError naming the op, the argument and the
    fix, at trace time (under jit, and inside a shard_map over another axis)."""
    with jax.enable_x64(True):
        x, _ = data()
        p = params()
    pattern = rf"{name}: axis_name='batch' names no mapped axis.*shard_map"
    with pytest.raises(NameError, match=pattern):
        jax.jit(lambda x: call(name, jb, x, p, axis_name="batch"))(x)
    f = jax.shard_map(
        lambda x: call(name, jb, x, p, axis_name="batch")[0],
        mesh=mesh(),
        in_specs=P("data"),
        out_specs=P("data"),
    )
    with pytest.raises(NameError, match=pattern):
        jax.jit(f)(x)


# --------------------------------------------------------------------- ghost batches


def ghost_by_hand(name, x, p, v, mask=None):
    """Ghost batches composed from one plain call per sub-batch of ``v`` rows: y
    concatenated, statistics averaged over the sub-batches."""
    ys, sts = [], []
    for j in range(x.shape[0] // v):
        sl = slice(j * v, (j + 1) * v)
        y, st = call(name, jb, x[sl], p, mask=None if mask is None else mask[sl])
        ys.append(y)
        sts.append(st)
    return jnp.concatenate(ys), jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *sts)


def ghost_loss(y, st, ct):
    out = jnp.sum(y * ct)
    if st.var is not None:
        out = out + jnp.sum(jnp.cos(st.var))
    return out + jnp.sum(jnp.sin(st.mean))


@pytest.mark.parametrize("name", ["batch_norm", "batch_center", "batch_inhib_groups2"])
def test_ghost_batches_equal_one_call_per_sub_batch(name):
    """virtual_batch_size=v: y and the statistics equal v-row calls on each sub-batch
    (statistics: their mean), and so do dx and dparams of a loss of y and the statistics
    (the parameter gradients sum over the sub-batches)."""
    v = 8
    with jax.enable_x64(True):
        x, ct = data()
        x = jnp.stack([x, 2.0 * x + 1.0], axis=1)  # (B, 2, N): a spatial axis too
        ct = jnp.stack([ct, -ct], axis=1)
        p = params()

        def run(fwd):
            def f(x, p):
                y, st = fwd(x, p)
                return ghost_loss(y, st, ct), (y, st)

            (dx, dp), (y, st) = jax.grad(f, argnums=(0, 1), has_aux=True)(x, p)
            return y, st, dx, dp

        got = jax.jit(lambda x, p: run(lambda x, p: call(name, jb, x, p, virtual_batch_size=v)))
        want = jax.jit(lambda x, p: run(lambda x, p: ghost_by_hand(name, x, p, v)))
        got, want = got(x, p), want(x, p)
        close(got, want)
        # and it is not the full-batch normalization (the test can fail)
        assert np.max(np.abs(np.asarray(got[0] - call(name, jb, x, p)[0]))) > 1e-3


def test_ghost_batches_masked_and_errors():
    """A masked ghost batch equals the masked call on its sub-batch; v must divide B and
    the batch axis must not be the feature axis."""
    v = 8
    with jax.enable_x64(True):
        x, _ = data()
        mask = uneven_mask()
        p = params()
        for name in ("batch_norm", "batch_inhib"):
            got = call(name, jb, x, p, mask=mask, virtual_batch_size=v)
            close(got, ghost_by_hand(name, x, p, v, mask))
    with pytest.raises(ValueError, match=r"batch_norm: virtual_batch_size=5 must divide.*32"):
        jb.batch_norm(x, virtual_batch_size=5)
    with pytest.raises(ValueError, match=r"batch_inhib: virtual_batch_size.*feature axis"):
        jb.batch_inhib(x, jnp.zeros((B, B)), axis=0, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"batch_center: virtual_batch_size must be an int"):
        jb.batch_center(x, virtual_batch_size=0)


def test_ghost_batches_leave_out_empty_sub_batches():
    """A sub-batch with no valid value has no statistics: it is left out of the average
    (per feature with an element mask), in the op and in the reference alike. Averaging it
    in as zeros would halve the mean here (the test can fail: the plain mean over all
    sub-batches differs)."""
    v = 8  # 4 sub-batches
    with jax.enable_x64(True):
        x, _ = data()
        p = params()
        rows = jnp.arange(B)
        # batch_inhib: whole rows; sub-batches 1 and 3 hold none
        row_mask = (rows < 5) | ((rows >= 16) & (rows < 20))
        # batch_norm: feature 0 has no value in sub-batch 2, every other feature has
        elem = jnp.broadcast_to(row_mask[:, None], (B, N)) | ((rows >= 8) & (rows < 12))[:, None]
        elem = elem & ~(((rows >= 16) & (rows < 24))[:, None] & (jnp.arange(N) == 0))
        for name, mask in (("batch_norm", elem), ("batch_inhib_groups2", row_mask)):
            _, st_all = ghost_by_hand(name, x, p, v, mask)
            parts = [call(name, jb, x[j * v : (j + 1) * v], p, mask=mask[j * v : (j + 1) * v])[1]
                     for j in range(B // v)]  # fmt: skip
            mk = jnp.broadcast_to(mask if mask.ndim == 2 else mask[:, None], (B, N))
            has = jnp.any(mk.reshape(B // v, v, N), axis=1)  # (sub-batch, feature)

            def avg(*a, has=has):
                s = jnp.stack(a)
                w = has if s.shape[1:] == (N,) else jnp.any(has, 1)[:, None, None, None]
                return jnp.sum(jnp.where(w, s, 0.0), 0) / jnp.sum(w, 0)

            want = jax.tree.map(avg, *parts)
            for mod in (jb, ref):
                got = call(name, mod, x, p, mask=mask, virtual_batch_size=v)[1]
                close(got, want)
            assert np.max(np.abs(np.asarray(st_all.mean - want.mean))) > 0.1


def test_ghost_sub_batch_empty_on_some_devices_counts():
    """Under shard_map with axis_name, sub-batch j of every device forms one group: it is
    left out only when it is empty on every device. 8 devices, 4 rows each, v=2: group 0
    has valid rows on device 3 only, group 1 on none; the statistics are those of group 0
    gathered on one device."""
    nd, v = ND, 2
    with jax.enable_x64(True):
        x, _ = data()
        p = params()
        dev = jnp.arange(B) // (B // nd)
        pos = jnp.arange(B) % (B // nd)
        mask = (dev == 3) & (pos < v)
        f = jax.jit(
            jax.shard_map(
                lambda x, m: jb.batch_norm(
                    x, p["scale"], p["bias"], mask=m, axis_name="data", virtual_batch_size=v
                )[1],
                mesh=mesh(), in_specs=(P("data"), P("data")), out_specs=P(),
            )
        )  # fmt: skip
        got = f(x, mask)
        group0 = pos < v
        want = call("batch_norm", jb, x[group0], p, mask=mask[group0])[1]
        close(got, want)


# --------------------------------------------------------------------------- training

STEPS = 3


def digits_like(key, steps=STEPS):
    """``steps`` global batches of B rows of 64 'pixels' and 10 labels (random: the test
    is about equality of two runs, not learning)."""
    kx, ky = jax.random.split(key)
    x = jax.random.uniform(kx, (steps, B, 64), jnp.float32)
    y = jax.random.randint(ky, (steps, B), 0, 10)
    return x, y


def run_steps(step, state, xb, yb, keys):
    losses = []
    for t in range(xb.shape[0]):
        state, (loss, _) = step(state, xb[t], yb[t], keys[t])
        losses.append(loss)
    return state, jnp.stack(losses)


def assert_identical_on_every_device(tree):
    for leaf in jax.tree.leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == ND
        for sh in shards[1:]:
            np.testing.assert_array_equal(sh, shards[0])  # bitwise


def test_gspmd_training_equals_single_device():
    """train.train_step on the MLP with BatchNorm + BatchInhib and dropout, SGD, 3 steps:
    run by parallel.data_parallel with the global batch split over 8 devices, it ends with
    the single-device run's losses, parameters and batch_stats (float32 round-off); the
    running statistics are the same bits on every device."""
    model = MLP((16, 16), norm="batchnorm+inhib", dropout_rate=0.2)
    tx = optax.sgd(0.1)
    xb, yb = digits_like(jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), STEPS)
    state0 = train.init_state(model, tx, jax.random.key(0), xb[0])
    step = functools.partial(train.train_step, model, tx)

    s1, l1 = run_steps(jax.jit(step), state0, xb, yb, keys)
    dp_step = parallel.data_parallel(step, mesh(), donate=False)
    s8, l8 = run_steps(dp_step, parallel.replicate(state0, mesh()), xb, yb, keys)

    assert s8.params["dense0"]["kernel"].sharding.is_fully_replicated
    close(l8, l1, RTOL32, ATOL32)
    close(s8.params, s1.params, RTOL32, ATOL32)
    close(s8.batch_stats, s1.batch_stats, RTOL32, ATOL32)
    assert_identical_on_every_device(s8.batch_stats)
    assert_identical_on_every_device(s8.params)
    # the statistics moved: the test compares something
    assert np.max(np.abs(np.asarray(s1.batch_stats["bn0"]["mean"]))) > 1e-3


def make_sync_net(axis_name):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool):
            x = nn.Dense(8)(x)
            x = bl.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=axis_name)(x)
            x = nn.relu(x)
            x = bl.BatchInhib(
                use_running_average=not train, momentum=0.9, groups=2, axis_name=axis_name
            )(x)
            return nn.Dense(10)(x)

    return Net()


def test_shard_map_training_with_axis_name_equals_single_device():
    """The modules with axis_name='data' under parallel.shard_map_step (a per-device step:
    loss = the device's share of the global mean, gradients summed over devices by the
    ops' rules): 3 SGD steps end with the single-device parameters and batch_stats, and
    the running statistics are the same bits on every device."""
    tx = optax.sgd(0.1)
    xb, yb = digits_like(jax.random.key(4))
    keys = jax.random.split(jax.random.key(5), STEPS)

    def make_step(model, n_share):
        def step(state, x, y, key):
            def f(p):
                loss, aux = train.loss_and_logits(model, p, state.batch_stats, x, y, key)
                return loss / n_share, aux

            (loss, (_, stats)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
            if n_share > 1:  # the per-device shares add up to the global mean loss
                loss = lax.psum(loss, "data")
            updates, opt = tx.update(grads, state.opt_state, state.params)
            return train.State(optax.apply_updates(state.params, updates), stats, opt), (
                loss,
                loss,
            )

        return step

    single, synced = make_sync_net(None), make_sync_net("data")
    state0 = train.init_state(single, tx, jax.random.key(0), xb[0])
    s1, l1 = run_steps(jax.jit(make_step(single, 1)), state0, xb, yb, keys)
    sm_step = parallel.shard_map_step(make_step(synced, ND), mesh())
    s8, l8 = run_steps(sm_step, parallel.replicate(state0, mesh()), xb, yb, keys)
    close(l8, l1, RTOL32, ATOL32)
    close(s8.params, s1.params, RTOL32, ATOL32)
    close(s8.batch_stats, s1.batch_stats, RTOL32, ATOL32)
    assert_identical_on_every_device(s8.batch_stats)


def test_cli_train_devices_matches_single_device(tmp_path):
    """``jax-batchinhib train --devices 2`` (a fresh process: the CLI sets up the CPU
    devices itself) gives the loss and accuracy curves of the single-device run with the
    same global batches, to float32 round-off.

    Variants two_branch and batchnorm, train and test curves. (The example MLP has no
    Dense bias before its BatchNorm: such a bias has an exactly zero gradient, Adam turns
    its round-off into lr-sized moves that differ between summation orders, and the
    running mean, hence the test curve, would follow them; docs/scaling.md.)"""
    import json
    import subprocess
    import sys

    args = ["--epochs", "1", "--seeds", "1", "--batch-size", "64", "--quiet", "--no-plot"]
    variants = ["two_branch", "batchnorm"]
    out = tmp_path / "dp2"
    proc = subprocess.run(
        [sys.executable, "-m", "jax_batchinhib", "train", "--devices", "2", "--out", str(out)]
        + args
        + ["--variants", *variants],
        capture_output=True,
        text=True,
        timeout=300,  # XLA_FLAGS: this process's (conftest.py)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((out / "results.json").read_text())
    assert got["config"]["devices"] == 2
    data = train.load_digits_split()
    for res in got["results"]:
        want = train.train_variant(res["variant"], data, epochs=1, seeds=1, batch_size=64, lr=3e-3)
        for k in ["train_loss", "train_acc", "test_loss", "test_acc"]:
            close(res["curves"][k], want["curves"][k], RTOL32, ATOL32)


def test_cli_devices_errors():
    """--devices must divide the batch size and be available."""
    data = train.load_digits_split()
    with pytest.raises(
        ValueError, match=r"train: --batch-size 60 must be divisible by --devices 8"
    ):
        train.train_variant("none", data, epochs=1, seeds=1, batch_size=60, lr=1e-3, devices=8)
    with pytest.raises(ValueError, match=r"make_mesh: n_devices=9 but JAX sees 8"):
        parallel.make_mesh(9)


# ---------------------------------------------------------------- Explicit-sharding mesh

EXPLICIT_OPS = {
    "batch_norm": lambda m, x, v, k: m.batch_norm(x, v, v, mask=k)[0],
    "batch_norm_two_pass": lambda m, x, v, k: m.batch_norm(x, v, v, use_fast_variance=False)[0],
    "batch_center": lambda m, x, v, k: m.batch_center(x, v, mask=k)[0],
    "batch_inhib": lambda m, x, v, k: m.batch_inhib(x, jnp.outer(v, v), mask=k)[0],
    "batch_inhib_groups": lambda m, x, v, k: m.batch_inhib(x, v.reshape(2, 2)[:, :, None] * v[:2], groups=2)[0],  # noqa: E501
    "iter_norm": lambda m, x, v, k: m.iter_norm(x, v, v, mask=k)[0],
    "zca_norm": lambda m, x, v, k: m.zca_norm(x, v, v, groups=2)[0],
    "batch_norm_ghost": lambda m, x, v, k: m.batch_norm(x, v, v, virtual_batch_size=4, mask=k)[0],
    "batch_norm_inference": lambda m, x, v, k: m.batch_norm_inference(x, v, v, v, v + 1),
    "iter_norm_inference": lambda m, x, v, k: m.iter_norm_inference(x, v, v, v, jnp.diag(v)),
    "batch_inhib_inference": lambda m, x, v, k: m.batch_inhib_inference(x, jnp.outer(v, v), jnp.diag(v + 1)),  # noqa: E501
}  # fmt: skip


def _explicit_mesh():
    return jax.make_mesh((ND,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("module", ["ops", "reference"])
@pytest.mark.parametrize("name", list(EXPLICIT_OPS))
def test_explicit_mesh_batch_sharded_equals_unsharded(name, module):
    """jax.sharding.AxisType.Explicit types each array's sharding; the shift's slice of the
    first row and the gather of the first valid one, on the sharded batch axis, were
    ShardingTypeErrors, and so was the covariance summed over sharded rows. Now: y and
    the gradients of x and of the per-feature parameter equal the unsharded run, in
    float64 to 1e-10 of each one's largest entry (the sums run in another order; in
    float32 some gradients, small differences of large terms, differ by 1e-3 of
    themselves), and y keeps x's sharding."""
    mod = jb if module == "ops" else ref
    f = EXPLICIT_OPS[name]
    with jax.enable_x64(True):
        x0 = 3 + jax.random.normal(jax.random.key(0), (B, N), jnp.float64)
        k0 = jnp.arange(B) % 5 != 0
        v = jnp.linspace(0.5, 1.5, N, dtype=jnp.float64)
        ct = jnp.sin(jnp.arange(B * N, dtype=jnp.float64)).reshape(B, N)

        def run(x, v, k):
            y = f(mod, x, v, k)
            g = jax.grad(lambda x, v: jnp.sum(f(mod, x, v, k) * ct), argnums=(0, 1))(x, v)
            return y, g

        want = jax.jit(run)(x0, v, k0)
        mesh = _explicit_mesh()
        # the ops without jax.set_mesh: the arrays carry their mesh (a bare PartitionSpec
        # as an out_sharding needed the context, and failed without it). Autodiff of the
        # references needs it: JAX's transpose of a product over sharded rows (the
        # inference forms' dR) leaves the output sharding to the context.
        ctx = jax.set_mesh(mesh) if module == "reference" else contextlib.nullcontext()
        with ctx:
            x = jax.device_put(x0, NamedSharding(mesh, P("data", None)))
            k = jax.device_put(k0, NamedSharding(mesh, P("data")))
            got = jax.jit(run)(x, v, k)
            assert jax.typeof(got[0]).sharding.spec == P("data", None)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, atol=1e-10 * float(np.abs(b).max()), rtol=0)


def test_explicit_mesh_feature_sharded():
    """Features sharded on an Explicit mesh: the per-feature ops work (a parameter's
    cotangent, summed from feature-sharded rows, is given the parameter's own sharding),
    and the decorrelating ops refuse with what to do instead."""
    x0 = 3 + jax.random.normal(jax.random.key(0), (4, 2 * ND))
    v = jnp.linspace(0.5, 1.5, 2 * ND)
    mesh = _explicit_mesh()

    def grads(x, v):
        def loss(x, v):
            return jnp.sum(jb.batch_norm(x, v, v)[0] * jnp.cos(x)) + jnp.sum(
                jb.batch_norm_inference(x, v, v, v, v + 1) ** 2
            )

        return jax.grad(loss, argnums=(0, 1))(x, v)

    want = jax.jit(grads)(x0, v)
    with jax.set_mesh(mesh):
        x = jax.device_put(x0, NamedSharding(mesh, P(None, "data")))
        got = jax.jit(grads)(x, v)
        for op in (
            lambda x: jb.batch_inhib(x, jnp.zeros((2 * ND, 2 * ND))),
            lambda x: jb.zca_norm(x),
            lambda x: jb.iter_norm_inference(x, None, None, v, jnp.eye(2 * ND)),
        ):
            match = r"sharded along its feature axis 1 on an Explicit mesh .*reshard\(x, "
            with pytest.raises(NotImplementedError, match=match + r"PartitionSpec\('data', None"):
                jax.jit(op)(x)
        xr = jax.device_put(x0.T, NamedSharding(mesh, P("data", None)))  # 16 rows on 8
        match = r"batch_norm: virtual_batch_size=4 splits the 16 rows into 4 ghost batches"
        with pytest.raises(NotImplementedError, match=match + r".* a multiple of 8 \(at most 2\)"):
            jax.jit(lambda x: jb.batch_norm(x, virtual_batch_size=4))(xr)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)


def test_explicit_mesh_modules_train_like_flax():
    """linen and NNX BatchNorm train on a batch sharded over an Explicit mesh, as flax's
    do: the same outputs and running statistics as flax's (unbiased=False)."""
    import flax.linen as nn
    from flax import nnx

    from jax_batchinhib import nnx as bnx

    x0 = 3 + jax.random.normal(jax.random.key(1), (B, N))
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        x = jax.device_put(x0, NamedSharding(mesh, P("data", None)))
        outs = []
        for mdl in (
            nn.BatchNorm(use_running_average=False),
            bl.BatchNorm(use_running_average=False, unbiased=False),
        ):  # noqa: E501
            v = mdl.init(jax.random.key(0), x)
            y, upd = jax.jit(lambda v, x, mdl=mdl: mdl.apply(v, x, mutable=["batch_stats"]))(v, x)
            outs.append((y, upd["batch_stats"]))
        for cls, kw in ((nnx.BatchNorm, {}), (bnx.BatchNorm, {"unbiased": False})):
            bn = cls(N, rngs=nnx.Rngs(0), **kw)
            y = nnx.jit(lambda m, x: m(x))(bn, x)
            outs.append((y, {"mean": bn.mean[...], "var": bn.var[...]}))
    for ours, theirs in ((outs[1], outs[0]), (outs[3], outs[2])):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, theirs
        )  # noqa: E501


def test_explicit_mesh_two_sharded_batch_axes():
    """x of shape (4, 8, 3, 5) sharded over a 2-D Explicit mesh on its first two axes,
    both reduced: the shift is gathered along each in turn (the second gather read the
    first one's sharding object as a spec and failed). y and dx equal the unsharded run
    in float64 to 1e-10 of their largest entries."""
    two = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with jax.enable_x64(True):
        x0 = 2 + jax.random.normal(jax.random.key(0), (4, 8, 3, 5), jnp.float64)

        def run(x):
            y = jb.batch_norm(x)[0]
            return y, jax.grad(lambda x: jnp.sum(jb.batch_norm(x)[0] * jnp.cos(x)))(x)

        want = jax.jit(run)(x0)
        with jax.set_mesh(two):
            got = jax.jit(run)(jax.device_put(x0, NamedSharding(two, P("a", "b", None, None))))
    for a, b in zip(got, want, strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, atol=1e-10 * float(np.abs(b).max()), rtol=0)


def test_explicit_mesh_second_order_params_ghost_masks_and_references():
    """More of the Explicit mesh (each failed before): jax.hessian through the
    covariance's product (an empty output spec broke vmap's rule), feature-sharded
    scale/bias in training mode (a slice of the sharded parameter), ghost batches with a
    NumPy mask (the sub-batches of mask and x sharded differently), the reference's shift
    on a non-leading reduced axis and its masks (use_autodiff modules); and the
    decorrelating ops' refusal of several feature axes with sharded rows."""
    two = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)  # noqa: E501
    x0 = 3 + jax.random.normal(jax.random.key(0), (16, 8))
    s0 = jnp.linspace(0.5, 1.5, 8)
    rows = np.arange(16) % 5 != 0
    f = lambda x, s: jnp.sum(jnp.sin(jb.iter_norm(x, s)[0]))  # noqa: E731
    want_h = jax.hessian(f, argnums=1)(x0, s0)
    want_bn = jb.batch_norm(x0, s0, s0)[0]
    want_g = jb.batch_norm(x0, virtual_batch_size=4, mask=rows)[0]
    want_masked = jb.batch_norm(x0, mask=rows)[0]
    x4 = 2 + jax.random.normal(jax.random.key(1), (8, 4, 2, 4))
    m4 = np.broadcast_to((np.arange(8) % 3 != 0)[:, None, None], (8, 2, 4))  # a row mask
    want_ref = ref.batch_norm(x4, axis=1, mask=m4)[0]
    with jax.set_mesh(two):
        x = jax.device_put(x0, NamedSharding(two, P("data", None)))
        np.testing.assert_allclose(
            jax.jit(jax.hessian(f, argnums=1))(x, s0), want_h, rtol=2e-4, atol=1e-5
        )  # noqa: E501
        xf = jax.device_put(x0, NamedSharding(two, P("data", "model")))
        sf = jax.device_put(s0, NamedSharding(two, P("model")))
        np.testing.assert_allclose(
            jax.jit(lambda x, s: jb.batch_norm(x, s, s)[0])(xf, sf), want_bn, rtol=1e-5, atol=1e-5
        )  # noqa: E501
        got_g = jax.jit(lambda x: jb.batch_norm(x, virtual_batch_size=4, mask=rows)[0])(x)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5)
        x4s = jax.device_put(x4, NamedSharding(two, P("data", None, None, None)))
        got_ref = jax.jit(lambda x: ref.batch_norm(x, axis=1, mask=m4)[0])(x4s)
        np.testing.assert_allclose(got_ref, want_ref, rtol=1e-5, atol=1e-5)
        mdl = bl.BatchNorm(use_running_average=False, use_autodiff=True)
        v = mdl.init(jax.random.key(0), x0)
        y, _ = jax.jit(lambda v, x: mdl.apply(v, x, mask=rows, mutable=["batch_stats"]))(v, x)
        np.testing.assert_allclose(
            np.asarray(y)[rows], np.asarray(want_masked)[rows], rtol=1e-5, atol=1e-5
        )
        with pytest.raises(NotImplementedError, match=r"batch_inhib: x has several feature "
                           r"axes \(1, 3\) and sharded rows on an Explicit mesh"):  # fmt: skip
            jax.jit(lambda x: jb.batch_inhib(x, jnp.zeros((8, 8)), axis=(1, 3))[0])(x4s)
