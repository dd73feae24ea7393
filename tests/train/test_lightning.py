"""``pyro_vae.lightning.PairModule``: the package's estimators and evaluator in Lightning's
Trainer, for the built-in VAE and users' pairs, in one process and under DDP (two CPU processes,
gloo). The runs are tests/support/lightning_runs.py's. Without the ``lightning`` package the
tests that train skip; those of its absence run.

Agreement is judged by the held-out log p̂_100(x) of the two trained pairs, each a mean over the
same 100 held-out datapoints with the same evaluation seed: they must differ by less than
``AGREEMENT_SE`` times the combined standard error of the two means, √(se₁² + se₂²).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from imports import top_level_modules_after
from user_models import FactorAnalysis, fa_guide, fa_model

from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.util.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
AGREEMENT_SE = 3
HELD_OUT_PARTICLES = 100
DDP_TIMEOUT_S = 300


@pytest.fixture
def runs():
    pytest.importorskip("lightning")
    import lightning_runs

    return lightning_runs


def held_out(pair, data) -> torch.Tensor:
    return evaluate_dataset(
        pair.model, pair.guide, data, num_particles=HELD_OUT_PARTICLES, batch_seed=0
    ).log_px


def assert_agree(a: torch.Tensor, b: torch.Tensor) -> None:
    se = math.hypot(a.std().item(), b.std().item()) / math.sqrt(len(a))
    assert abs(a.mean().item() - b.mean().item()) < AGREEMENT_SE * se, (a.mean(), b.mean(), se)


def test_the_factor_analysis_pair_trains_as_fit_trains_it(runs):
    from pyro_vae import fit

    module, metrics = runs.train_fa()
    losses = metrics["train_loss"]
    assert losses[-1] < losses[0] - 1, losses
    options = dict(runs.FA_RUN)
    pyro.set_rng_seed(runs.SEED)
    result = fit(FactorAnalysis(), runs.fa_split()[0], seed=runs.SEED, progress=False, **options)
    assert result.history.train_loss[-1] < result.history.train_loss[0] - 1
    test = runs.fa_split()[1]
    assert_agree(held_out(module.pair, test), held_out(result.model, test))


def test_the_builtin_vae_trains_with_warmup_and_is_scored_on_held_out_data(runs):
    from pyro_vae import VAE, load_digits

    images = torch.bernoulli(
        load_digits().train.images[:300], generator=torch.Generator().manual_seed(0)
    )
    steps, warmup, start = 4, 8, 0.01  # 200 images in batches of 50
    module, metrics = runs.train(
        VAE(64, latent_dim=2, hidden=(32,)),
        images[:200],
        6,
        50,
        val_data=images[200:],
        lr=0.03,
        warmup=warmup,
        warmup_start=start,
    )
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    first = sum(start + (1 - start) * step / warmup for step in range(steps)) / steps
    assert metrics["beta"][0] == pytest.approx(first)
    assert metrics["beta"][-1] == 1.0
    # log p̂_K ≥ the mean of the same K log-weights, datapoint by datapoint
    assert all(p >= e for p, e in zip(metrics["val_log_px"], metrics["val_elbo"]))
    assert metrics["val_log_px"][-1] > metrics["val_log_px"][0]


def test_plain_functions_get_their_params_made_before_the_optimizer_and_checkpointed(
    runs, tmp_path
):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from pyro_vae.lightning import PairModule

    train, test = runs.fa_split()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_log_px", mode="max")
    stop = EarlyStopping(monitor="val_log_px", mode="max", patience=2)
    module, metrics = runs.train(
        fa_model,
        train,
        8,
        100,
        val_data=test,
        guide=fa_guide,
        lr=0.05,
        val_particles=10,
        callbacks=(best, stop),
    )
    assert module.pair.adopted == ["encoder_weight", "encoder_scale", "loadings", "mean", "noise"]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert best.best_model_score.item() == max(metrics["val_log_px"])
    saved = torch.load(best.best_model_path, weights_only=False)["state_dict"]
    pyro.clear_param_store()
    loaded = PairModule.load_from_checkpoint(best.best_model_path, pair=fa_model, guide=fa_guide)
    loaded.prepare(train[:10])  # the pair's first run reads the loaded entries
    for name, value in loaded.pair.state_dict().items():
        assert torch.equal(value, saved[f"pair.{name}"]), name


def test_a_global_latent_is_weighted_by_batch_over_training_set_size(runs):
    from pyro.infer.autoguide import AutoNormal

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0)) + 1.0
    posterior_sd = (1 / (len(x) + 10.0**-2)) ** 0.5  # conjugate: N(μ; Σx / (N + 1/100), ·)
    guide = AutoNormal(model)
    module, _ = runs.train(model, x, 60, 100, guide=guide, lr=0.05, particles=10)
    assert module.num_data == len(x)
    # weighted by 1 per batch instead of B / N, the posterior would be √(N / B) = 2 times wider
    ratio = guide.scales.mu.detach() / posterior_sd
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def test_a_data_plate_whose_scale_would_be_wrong_is_refused(runs):
    from pyro.infer.autoguide import AutoNormal

    from pyro_vae.lightning import PairModule

    def subsampled(x):
        with pyro.plate("data", 400, subsample_size=x.shape[0]):
            pyro.sample("x", dist.Normal(pyro.param("m", torch.zeros(2)), 1.0).to_event(1), obs=x)

    def nothing(x):
        pass

    batch = torch.zeros(50, 2)
    PairModule(subsampled, nothing, num_data=400).prepare(batch)  # one process: as fit does
    with pytest.raises(ConfigError, match=r"^the data plate 'data' draws its own subsample"):
        PairModule(subsampled, nothing, num_data=400).prepare(batch, world_size=2)
    with pytest.raises(
        ConfigError, match="subsampled from 400 datapoints but the training set has 300"
    ):
        PairModule(subsampled, nothing, num_data=300).prepare(batch)

    def global_mean(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    with pytest.raises(
        ConfigError, match=r"global latents \['mu'\].*give PairModule\(\.\.\., num_data=N\)"
    ):
        PairModule(global_mean, AutoNormal(global_mean)).prepare(batch)


def test_a_parameter_made_after_the_optimizer_is_refused_after_the_first_step(runs, monkeypatch):
    from pyro.infer.autoguide import AutoNormal
    from torch import nn

    from pyro_vae.lightning import PairModule

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(2))
            self.auto = AutoNormal(self.model)  # its parameters come with its first run

        def model(self, x):
            mu = pyro.sample("mu", dist.Normal(self.shift, 1.0).to_event(1))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

        def guide(self, x):
            return self.auto(x)

    monkeypatch.setattr(PairModule, "prepare", lambda self, *args, **kwargs: None)
    with pytest.raises(
        ConfigError, match=r"made parameters \['auto\.locs\.mu_unconstrained'.*during training"
    ):
        runs.train(Pair(), torch.zeros(20, 2), 1, 10)


def _two_processes(tmp_path: Path, which: str) -> dict[str, torch.Tensor]:
    """lightning_runs.py's run ``which`` under DDP on two CPU processes: rank 0's trained
    weights, after checking that both ranks hold the same and that the loss fell."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(SUPPORT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(SUPPORT / "lightning_runs.py"), str(tmp_path), which],
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DDP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [torch.load(tmp_path / f"pair{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses[-1] < losses[0] - 1, losses
    return ranks[0]


@pytest.mark.slow
def test_two_ddp_processes_stay_in_sync_and_agree_with_one(runs, tmp_path):
    two = FactorAnalysis()
    two.load_state_dict(_two_processes(tmp_path, "fa"))
    one, _ = runs.train_fa()
    test = runs.fa_split()[1]
    assert_agree(held_out(two, test), held_out(one.pair, test))


@pytest.mark.slow
def test_the_builtin_vae_under_ddp_agrees_with_one_process_and_with_fit(runs, tmp_path):
    from pyro_vae import fit

    two = runs.make_vae()
    two.load_state_dict(_two_processes(tmp_path, "vae"))
    one, _ = runs.train_vae()
    train, test = runs.vae_split()
    pyro.set_rng_seed(runs.SEED)
    options = {k: runs.VAE_RUN[k] for k in ("epochs", "batch_size", "lr")}
    fitted = fit(runs.make_vae(), train, seed=runs.SEED, progress=False, **options).model
    reference = held_out(fitted, test)
    assert_agree(held_out(two, test), held_out(one.pair, test))
    assert_agree(held_out(two, test), reference)
    assert_agree(held_out(one.pair, test), reference)


def test_without_lightning_the_module_says_how_to_install_it(monkeypatch):
    import pyro_vae.lightning
    import pyro_vae.train
    import pyro_vae.train.lightning as installed
    from pyro_vae.train.lightning import INSTALL

    monkeypatch.setitem(sys.modules, "lightning", None)  # ``import lightning`` fails
    monkeypatch.delitem(sys.modules, "pyro_vae.train.lightning")
    monkeypatch.setattr(pyro_vae.train, "lightning", installed)  # given back at the end
    fresh = importlib.import_module("pyro_vae.train.lightning")  # importing it needs none
    monkeypatch.setitem(sys.modules, "pyro_vae.train.lightning", fresh)
    for where in (fresh, pyro_vae.lightning):
        with pytest.raises(ConfigError) as caught:
            _ = where.PairModule
        assert str(caught.value) == INSTALL
    assert INSTALL == "PairModule needs the lightning package: pip install 'pyro-vae[lightning]'"


def test_importing_the_package_imports_no_lightning():
    statements = "import pyro_vae, pyro_vae.train, pyro_vae.lightning; pyro_vae.fit"
    assert top_level_modules_after(statements, ("lightning", "pytorch_lightning")) == []
