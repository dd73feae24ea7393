"""The package on a CUDA GPU: evaluation against a closed form, the fused loss against the traced
estimator, and a resumed run against an uninterrupted one. Skipped without CUDA (conftest.py).

The CPU versions of these tests compare bit for bit; on a GPU the same properties are checked to
float32 rounding, since kernels for equal operations may differ between launches of cuBLAS.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from gradients import Calling, loss_and_grads
from linear_gaussian import LinearGaussian

from pyro_vae import TrainConfig, fit
from pyro_vae import evaluate as ev
from pyro_vae.infer import make_estimator
from pyro_vae.models import VAE
from pyro_vae.train.fused import FusedLoss, supports

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 1e-6


def test_exact_posterior_on_the_gpu_gives_the_closed_form_marginal():
    """With the guide equal to the posterior every log-weight is log p(x), whatever was drawn."""
    pyro.set_rng_seed(0)
    lg = LinearGaussian.random(6, 3, dtype=torch.float64)  # its guide is the exact posterior
    x = lg.sample(20, torch.Generator().manual_seed(1))
    exact = lg.log_marginal(x).detach()
    lg, x = lg.to(CUDA), x.to(CUDA)
    result = ev.evaluate(lg.model, lg.guide, x, num_particles=64, particle_chunk=24)
    torch.testing.assert_close(result.log_px.cpu(), exact, atol=1e-10, rtol=0)
    assert result.gap.abs().max().item() < 1e-10


@pytest.mark.parametrize("name", ["trace", "meanfield"])
def test_fused_loss_equals_the_traced_estimator_on_the_gpu(name):
    vae = VAE(12, 3, (16, 8))
    x = torch.bernoulli(torch.full((7, 12), 0.4), generator=torch.Generator().manual_seed(2))
    vae, x = vae.to(CUDA), x.to(CUDA)
    estimator = make_estimator(name, beta=0.5, max_plate_nesting=1)
    assert supports(vae, estimator)
    fused = FusedLoss(vae, estimator)
    traced_loss, traced_grads = loss_and_grads(vae, (x,), Calling(fused.traced), 5)
    traced_rng = torch.cuda.get_rng_state()
    fused_loss, fused_grads = loss_and_grads(vae, (x,), Calling(fused), 5)
    assert torch.equal(traced_rng, torch.cuda.get_rng_state())  # the same draws were consumed
    torch.testing.assert_close(fused_loss, traced_loss, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    for want, got in zip(traced_grads, fused_grads):
        torch.testing.assert_close(got, want, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_a_resumed_gpu_run_reaches_the_uninterrupted_result(tmp_path):
    """The checkpoint carries the GPU's random-number state: without it the resumed epochs would
    draw other noise and end far from the uninterrupted run."""
    config = TrainConfig(
        epochs=4, batch_size=128, eval_particles=2, final_particles=0, device="cuda"
    )
    full = fit(config=config, run_dir=tmp_path / "full", progress=False)
    fit(config=config.replace(epochs=2), run_dir=tmp_path / "part", progress=False)
    resumed = fit(config=config, run_dir=tmp_path / "part", resume=True, progress=False)
    assert all(p.device.type == "cuda" for p in resumed.model.parameters())
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(
            resumed.model.state_dict()[name], value, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL, msg=name
        )
    torch.testing.assert_close(
        torch.tensor(resumed.history.train_loss),
        torch.tensor(full.history.train_loss),
        rtol=FLOAT32_RTOL,
        atol=0,
    )
