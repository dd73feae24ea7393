import os
import shutil
import signal
import tempfile
from pathlib import Path

import pyro
import pytest
import torch
from benchmark_loader import load_benchmark
from tiny_runs import TINY


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
    # ignored, and so would every program the tests start, which then could not be
    # interrupted: the tests of Ctrl-C need it at its default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Compiled steps are kept in a folder of the suite's own (shared by the programs the tests
    # start), so that no entry of an earlier suite or of the user's runs is read.
    if "PYRO_VAE_COMPILE_CACHE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="pyro_vae_compile_cache_")
        os.environ["PYRO_VAE_COMPILE_CACHE"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished run folder of the smallest command-line run, trained once per module."""
    from pyro_vae.app.cli import main

    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A copy of ``trained_run`` that a test may change."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
