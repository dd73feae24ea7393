"""pyro_vae.util.rng.forked_rng: the one fork of the random state, and the probes that use it."""

from __future__ import annotations

import pytest
import torch
from user_models import FA_DIM, FactorAnalysis

from pyro_vae import check_model
from pyro_vae.util.rng import cuda_devices, forked_rng


def test_the_cpu_state_is_restored_after_the_block_and_after_an_error():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with forked_rng():
        inside = torch.rand(4)
    with pytest.raises(RuntimeError), forked_rng():
        torch.rand(100)
        raise RuntimeError("boom")
    assert torch.equal(torch.rand(4), expected)
    assert torch.equal(inside, expected)  # the block drew from a copy of the same state


class FakeCuda:
    """Stands in for CUDA's generators: records which device states are read and written."""

    def __init__(self, monkeypatch, started: bool, count: int = 2):
        self.read, self.written = [], []
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    def get(self, device="cuda"):
        self.read.append(device)
        return torch.tensor([device], dtype=torch.uint8)

    def set(self, state, device="cuda"):
        self.written.append((device, int(state[0])))


def test_before_cuda_starts_a_fork_does_not_touch_it(monkeypatch):
    cuda = FakeCuda(monkeypatch, started=False)
    assert cuda_devices() == []
    with forked_rng():
        torch.rand(2)
    assert cuda.read == [] and cuda.written == []


def test_once_cuda_started_every_device_is_saved_and_restored(monkeypatch):
    cuda = FakeCuda(monkeypatch, started=True, count=2)
    with forked_rng():
        assert cuda.read == [0, 1] and cuda.written == []
    assert cuda.written == [(0, 0), (1, 1)]


def test_the_model_check_forks_the_cuda_state_as_well(monkeypatch):
    """The probes of check_model draw on the pair's device: with CUDA started they fork its
    state too, not only the CPU's."""
    model, x = FactorAnalysis(), torch.randn(5, FA_DIM)
    cuda = FakeCuda(monkeypatch, started=True, count=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_model(model, x)
    assert torch.equal(torch.rand(3), expected)
    assert cuda.read and cuda.written == [(0, 0)] * len(cuda.read)


@pytest.mark.cuda
def test_the_model_check_leaves_the_cuda_generator_where_it_was():
    device = torch.device("cuda")
    model, x = FactorAnalysis().to(device), torch.randn(5, FA_DIM, device=device)
    torch.cuda.manual_seed(0)
    before = torch.cuda.get_rng_state(device)
    check_model(model, x)
    assert torch.equal(torch.cuda.get_rng_state(device), before)
