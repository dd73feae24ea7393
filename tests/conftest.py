import pyro
import pytest
import torch

from benchmark_loader import load_benchmark


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from the same seed and an empty param store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/compare_estimators.py as a module."""
    return load_benchmark("compare_estimators", monkeypatch)
