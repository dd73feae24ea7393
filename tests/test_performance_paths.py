"""The fast paths give the general paths' numbers.

Two shortcuts make the package's training step cheaper (``docs/performance.rst``):

* a single draw (P·K = 1) is traced without the particle plate, and each estimator computes
  only the log-densities it needs (``meanfield``: log p(x|z) and the KL);
* :func:`pyro_vae.models.register_module` skips its ``pyro.param`` messages when the store
  already holds the module's tensors and no effect handler would see the messages.

Each test states an equivalence: the same random draws give bit-identical losses and
gradients with and without the particle plate, Pyro's own estimators' values to float
rounding, and the param store stays what ``pyro.param`` calls would have made it. Nothing is
timed here; ``benchmarks/bench_perf.py`` times.
"""

from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.params import param_with_module_name
from torch import nn

from pyro_vae import VAE
from pyro_vae.cvae import CVAE
from pyro_vae.models import register_module
from pyro_vae.objectives import ESTIMATORS, ELBOEstimator, make_estimator
from pyro_vae.vae2 import VAE2

from linear_gaussian import LinearGaussian

D, LATENT, N = 12, 3, 7
STOCK = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _binary(n: int = N, d: int = D) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(2))


def _vae(**options) -> tuple[nn.Module, tuple]:
    return VAE(D, LATENT, (16, 8), **options), (_binary(),)


def _gaussian_vae() -> tuple[nn.Module, tuple]:
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    return VAE(D, LATENT, (16,), likelihood="gaussian"), (x,)


def _cvae() -> tuple[nn.Module, tuple]:
    return CVAE(D, 3, LATENT, (16,)), (_binary(), torch.arange(N) % 3)


def _vae2() -> tuple[nn.Module, tuple]:
    return VAE2(D, LATENT, (16,)), (_binary(),)


def _linear_gaussian() -> tuple[nn.Module, tuple]:
    lg = LinearGaussian.random(4, 2, noise_scale=0.7, guide="diagonal",
                               loc_shift=torch.tensor([0.3, -0.2]), scale_factor=1.3)
    return lg, (lg.sample(N, torch.Generator().manual_seed(1)),)


PAIRS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "vae": _vae, "vae-full-guide": lambda: _vae(guide="full"),
    "vae-gaussian-learned-scale": _gaussian_vae, "cvae": _cvae, "vae2": _vae2,
    "linear-gaussian": _linear_gaussian,
}


def _loss_and_grads(module: nn.Module, args: tuple, estimator: ELBOEstimator, seed: int
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in module.parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        loss = estimator.differentiable_loss(module.model, module.guide, *args)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ----------------------------------------------------------------------------- single draw

@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", ESTIMATORS)
def test_single_draw_without_the_particle_plate_is_bit_identical(pair, name, monkeypatch):
    module, args = PAIRS[pair]()
    beta = 0.7 if name in ("trace", "meanfield") else 1.0
    fast = _loss_and_grads(module, args, make_estimator(name, beta=beta, max_plate_nesting=1), 3)
    monkeypatch.setattr(ELBOEstimator, "single_draw_shortcut", False)
    plated = _loss_and_grads(module, args, make_estimator(name, beta=beta, max_plate_nesting=1),
                             3)
    assert torch.equal(fast[0], plated[0]), (fast[0], plated[0])
    for mine, theirs in zip(fast[1], plated[1]):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("pair", ["vae", "vae-full-guide", "cvae", "linear-gaussian"])
@pytest.mark.parametrize("name", sorted(STOCK))
def test_single_draw_equals_pyros_own_estimators(pair, name):
    module, args = PAIRS[pair]()
    ours = _loss_and_grads(module, args, make_estimator(name, max_plate_nesting=1), 4)
    reference = STOCK[name](max_plate_nesting=1)
    theirs = _loss_and_grads(module, args, reference, 4)
    torch.testing.assert_close(ours[0], theirs[0])
    for mine, want in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, want)


def test_float_loss_equals_the_differentiable_loss():
    module, args = _vae()
    for name in ESTIMATORS:
        estimator = make_estimator(name, max_plate_nesting=1)
        pyro.set_rng_seed(6)
        value = estimator.loss(module.model, module.guide, *args)
        pyro.set_rng_seed(6)
        tensor = estimator.differentiable_loss(module.model, module.guide, *args)
        assert value == pytest.approx(tensor.item(), rel=1e-6)


def test_meanfield_reads_neither_log_q_nor_the_log_prior():
    module, args = _vae()
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    particles = estimator._particles(module.model, module.guide, args, {})
    estimator._bound(particles, module.model, module.guide, args, {})
    assert "log_lik" in vars(particles)
    assert "log_q" not in vars(particles) and "log_prior" not in vars(particles)


def _undeclared_batch_dim(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(2, x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(x.new_zeros(x.shape), 1.0).to_event(1), obs=x)


def _undeclared_guide(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(2, x.shape[0]), 1.0))


@pytest.mark.parametrize("shortcut", [True, False])
def test_a_batch_dimension_outside_the_plates_is_an_error_either_way(shortcut, monkeypatch):
    monkeypatch.setattr(ELBOEstimator, "single_draw_shortcut", shortcut)
    with pytest.raises(ValueError), pyro.validation_enabled(False):
        make_estimator("trace", max_plate_nesting=1).differentiable_loss(
            _undeclared_batch_dim, _undeclared_guide, torch.zeros(N, 2))


# ----------------------------------------------------------------------------- registration

@pytest.fixture
def param_calls(monkeypatch) -> list[str]:
    """The names passed to ``pyro.param`` (which register_module calls through ``pyro``)."""
    calls: list[str] = []
    original = pyro.param

    def counting(name, *args, **kwargs):
        calls.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(pyro, "param", counting)
    return calls


def _store_holds(prefix: str, module: nn.Module) -> bool:
    store = pyro.get_param_store()
    return all(store.get_param(param_with_module_name(prefix, key)) is value
               for key, value in module.named_parameters())


def test_registration_is_skipped_once_in_place_and_unobserved(param_calls):
    vae, (x,) = _vae()
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert len(param_calls) == len(list(vae.parameters()))
    param_calls.clear()
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert param_calls == []
    assert _store_holds("vae.encoder", vae.encoder) and _store_holds("vae.decoder", vae.decoder)


def test_handlers_still_see_every_param():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    decoder = {param_with_module_name("vae.decoder", key) for key, _ in
               vae.decoder.named_parameters()}
    encoder = {param_with_module_name("vae.encoder", key) for key, _ in
               vae.encoder.named_parameters()}
    with poutine.trace(param_only=True) as capture:
        estimator.differentiable_loss(vae.model, vae.guide, x)
    assert set(capture.trace.param_nodes) == decoder | encoder
    assert set(poutine.trace(vae.model).get_trace(x).param_nodes) == decoder


def test_a_block_hiding_some_params_lets_the_others_through():
    vae, _ = _vae()
    register_module("vae.decoder", vae.decoder)
    hidden = param_with_module_name("vae.decoder", "net.0.weight")
    with poutine.trace(param_only=True) as capture, poutine.block(hide=[hidden]):
        register_module("vae.decoder", vae.decoder)
    assert set(capture.trace.param_nodes) == {
        param_with_module_name("vae.decoder", key)
        for key, _ in vae.decoder.named_parameters()} - {hidden}


def test_svi_with_a_pyro_optimizer_trains_after_the_fast_path():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    before = [p.detach().clone() for p in vae.parameters()]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), estimator)
    for _ in range(3):
        svi.step(x)
    assert all(not torch.equal(old, new) for old, new in zip(before, vae.parameters()))


def test_two_models_with_one_name_never_share_parameters(param_calls):
    (first, (x,)), (second, _) = _vae(), _vae()
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    for module in (first, second, first, second):
        estimator.differentiable_loss(module.model, module.guide, x)
        assert _store_holds("vae.decoder", module.decoder)
        assert _store_holds("vae.encoder", module.encoder)
    optimizer = torch.optim.Adam(first.parameters(), lr=1e-2)
    untouched = [p.detach().clone() for p in second.parameters()]
    estimator.differentiable_loss(first.model, first.guide, x).backward()
    optimizer.step()
    assert all(torch.equal(old, new) for old, new in zip(untouched, second.parameters()))


def test_a_cleared_store_or_a_replaced_parameter_is_registered_again():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    pyro.clear_param_store()
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert _store_holds("vae.decoder", vae.decoder)
    layer = vae.decoder.net[0]
    layer.weight = nn.Parameter(layer.weight.detach() + 1.0)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert _store_holds("vae.decoder", vae.decoder)
    name = param_with_module_name("vae.decoder", "net.0.weight")
    assert pyro.get_param_store().get_param(name) is layer.weight
