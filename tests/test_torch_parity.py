"""Running statistics and outputs against PyTorch's BatchNorm1d / BatchNorm2d.

Ours with ``unbiased=True`` (the default) keeps what torch keeps: torch's momentum p is
our 1 - p, torch's ``momentum=None`` (cumulative average) is ours. Dense (B, N) inputs
against BatchNorm1d, NHWC against BatchNorm2d on the NCHW transpose; three training
batches, then eval. float32 on both sides: 1e-5 relative for statistics, 1e-5 absolute
for outputs of O(1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_batchinhib import linen as bnn

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("torch_momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("layout", ["dense", "nhwc"])
def test_running_stats_and_outputs_match_torch(layout, torch_momentum):
    rng = np.random.default_rng(0)
    shape = (10, 4) if layout == "dense" else (3, 4, 2, 5)
    n = shape[-1]
    xs = [(2.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32) for _ in range(3)]
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)

    tbn = (torch.nn.BatchNorm1d if layout == "dense" else torch.nn.BatchNorm2d)(
        n, momentum=torch_momentum, eps=1e-5
    )
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(bias))

    def to_t(x):
        return torch.from_numpy(x if layout == "dense" else x.transpose(0, 3, 1, 2).copy())

    def from_t(y):
        y = y.detach().numpy()
        return y if layout == "dense" else y.transpose(0, 2, 3, 1)

    tbn.train()
    y_torch = [from_t(tbn(to_t(x))) for x in xs]
    tbn.eval()
    e_torch = from_t(tbn(to_t(xs[0])))

    ours = bnn.BatchNorm(momentum=None if torch_momentum is None else 1 - torch_momentum)

    def f(xs):
        v = ours.init(jax.random.key(0), xs[0], use_running_average=False)
        v = {**v, "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
        ys = []
        for x in xs:
            y, upd = ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            v = {**v, **upd}
            ys.append(y)
        return ys, v["batch_stats"], ours.apply(v, xs[0], use_running_average=True)

    ys, stats, e_ours = jax.jit(f)([jnp.asarray(x) for x in xs])
    for a, b in zip(ys, y_torch, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stats["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e_ours, e_torch, atol=1e-5, rtol=1e-5)
    if torch_momentum is None:
        np.testing.assert_array_equal(stats["count"], int(tbn.num_batches_tracked))
