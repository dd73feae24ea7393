"""The fused ``iwae`` loss of the built-in VAE (:mod:`pyro_vae.train.fused`) gives the traced
estimator's numbers bit for bit, and a hand-written torch IWAE's to float rounding.

With M = P·K > 1 draws the traced estimator runs the guide inside the particle plate, which
expands the guide's loc and scale to ``[M, N, L]`` and draws ε of that shape; the fused loss
expands them the same way and evaluates the same floating-point operations in the same order,
so ``torch.equal`` holds for the loss, every gradient and the random state after the call.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from gradients import Calling, loss_and_grads
from threads import one_thread
from torch.nn import functional as F

from pyro_vae import VAE, TrainConfig, fit
from pyro_vae.infer import ELBOEstimator, make_estimator
from pyro_vae.train.fused import FusedLoss, supports, training_loss

D, LATENT, N = 12, 3, 7
LIKELIHOODS = {
    "bernoulli": {},
    "gaussian-learned-scale": {"likelihood": "gaussian"},
    "gaussian-fixed-scale": {"likelihood": "gaussian", "obs_scale": 0.3},
    "bernoulli-exp-scale-tanh": {"scale_fn": "exp", "activation": "tanh"},
}
#: (P, K): several draws inside the log, several bounds, both, and one draw (trace's loss)
DRAWS = [(1, 5), (2, 3), (3, 1), (1, 1), (1, 50)]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _pair(options: dict) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE(D, LATENT, (16, 8), **options)
    generator = torch.Generator().manual_seed(2)
    if vae.likelihood == "gaussian":
        return vae, torch.randn(N, D, generator=generator)
    return vae, torch.bernoulli(torch.full((N, D), 0.4), generator=generator)


def _both(vae: VAE, x: torch.Tensor, estimator: ELBOEstimator, seed: int):
    fused = FusedLoss(vae, estimator)
    return [
        loss_and_grads(vae, (x,), Calling(loss_fn), seed) + (torch.get_rng_state(),)
        for loss_fn in (fused.traced, fused)
    ]


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("draws", DRAWS, ids=lambda pk: f"P{pk[0]}K{pk[1]}")
def test_fused_iwae_equals_the_traced_estimator_bit_for_bit(draws, beta, likelihood):
    vae, x = _pair(LIKELIHOODS[likelihood])
    p, k = draws
    estimator = make_estimator(
        "iwae", num_particles=p, importance_samples=k, beta=beta, max_plate_nesting=1
    )
    assert supports(vae, estimator)
    (traced, traced_grads, traced_rng), (fused, fused_grads, fused_rng) = _both(
        vae, x, estimator, seed=5
    )
    assert torch.equal(traced, fused), (traced, fused)
    for want, got in zip(traced_grads, fused_grads):
        assert torch.equal(want, got)
    assert any(g.abs().sum() > 0 for g in fused_grads)
    assert torch.equal(traced_rng, fused_rng)  # the same random numbers were consumed


def _hand_iwae(vae: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """−Σ_n log (1/K) Σ_k w_kn written in torch from the closed forms (Bernoulli pixels)."""
    loc, scale = vae.encoder(x)
    eps = torch.empty((k, *loc.shape)).normal_()  # the draw rsample makes
    z = loc + scale * eps
    logits = vae.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    ).sum(-1)
    log_w = log_lik + (-0.5 * z.square()).sum(-1) - (-0.5 * eps.square() - scale.log()).sum(-1)
    return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()


def test_fused_iwae_equals_a_hand_written_iwae_on_the_same_draws():
    vae, x = _pair({})
    estimator = make_estimator("iwae", importance_samples=5, max_plate_nesting=1)
    fused, fused_grads = loss_and_grads(vae, (x,), Calling(FusedLoss(vae, estimator)), 4)
    hand, hand_grads = loss_and_grads(vae, (x,), Calling(lambda x: _hand_iwae(vae, x, 5)), 4)
    torch.testing.assert_close(fused, hand, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, hand_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_and_traced_iwae_steps_land_on_the_same_parameters():
    x = _pair({})[1]
    finals = []
    for fused in (False, True):
        torch.manual_seed(1)
        vae = VAE(D, LATENT, (16,))
        estimator = make_estimator("iwae", importance_samples=4, max_plate_nesting=1)
        loss_fn = training_loss(vae, estimator, fused)
        assert isinstance(loss_fn, FusedLoss) == fused
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
        pyro.set_rng_seed(8)
        losses = []
        with pyro.validation_enabled(False):
            for _ in range(10):
                optimizer.zero_grad()
                loss = loss_fn(x)
                (loss / N).backward()
                optimizer.step()
                losses.append(loss.item())
        finals.append((losses, [p.detach().clone() for p in vae.parameters()]))
    (traced_losses, traced_params), (fused_losses, fused_params) = finals
    assert traced_losses == fused_losses
    assert all(torch.equal(a, b) for a, b in zip(traced_params, fused_params))


def test_fit_with_iwae_gives_the_same_history_with_the_fused_path_on_and_off(monkeypatch):
    calls = []
    original = ELBOEstimator.differentiable_loss

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ELBOEstimator, "differentiable_loss", counting)
    config = TrainConfig(
        epochs=2,
        batch_size=128,
        eval_particles=2,
        final_particles=3,
        device="cpu",
        elbo="iwae",
        importance_samples=3,
        beta=0.5,
        warmup=15,
    )
    runs = {}
    for fused in (True, False):
        calls.clear()
        runs[fused] = fit(config=config, progress=False, fused=fused)
        runs[fused, "traced steps"] = len(calls)
    assert runs[True, "traced steps"] == 0 < runs[False, "traced steps"]
    on, off = runs[True], runs[False]
    assert on.history.train_loss == off.history.train_loss
    assert on.history.test_elbo == off.history.test_elbo
    for key, value in off.model.state_dict().items():
        assert torch.equal(value, on.model.state_dict()[key]), key


@pytest.mark.parametrize("name", ["dreg", "vimco", "ciwae"])
def test_the_other_importance_weighted_estimators_keep_the_traced_path(name):
    vae = _pair({})[0]
    estimator = make_estimator(name, importance_samples=3, max_plate_nesting=1)
    assert not supports(vae, estimator)
    subclass = type("RecordingIWAE", (type(make_estimator("iwae")),), {})(importance_samples=3)
    assert not supports(vae, subclass)
