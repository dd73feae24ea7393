"""torch's optimizers by name with their options, and gradient clipping by norm: the step they
take, the run that trains with them and resumes bit for bit, and the refusals."""

import pytest
import torch

from pyro_vae.app.cli import main
from pyro_vae.runs.config import TrainConfig
from pyro_vae.train import make_optimizer, svi_step
from pyro_vae.util.errors import ConfigError

SMALL = ["--batch-size", "256", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--quiet"]


def test_an_optimizer_is_built_by_name_with_its_options():
    p = torch.nn.Parameter(torch.zeros(2))
    sgd = make_optimizer([p], 0.5, "sgd", {"momentum": 0.9, "nesterov": True})
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["lr"] == 0.5 and sgd.param_groups[0]["nesterov"] is True
    assert type(make_optimizer([p], 0.1, "adamw", {"betas": [0.8, 0.9]})) is torch.optim.AdamW
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer([p], 0.1, "lbfgs")  # its step needs a closure


def test_clipping_scales_the_gradient_down_to_the_norm():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    sgd = torch.optim.SGD([p], lr=1.0)
    svi_step(lambda: (p * p).sum(), 1, sgd, clip_norm=1.0)  # gradient (6, 8), norm 10
    torch.testing.assert_close(p.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))
    svi_step(lambda: (p * p).sum() / 100, 1, sgd, clip_norm=1.0)  # norm 0.1: left alone
    torch.testing.assert_close(p.detach(), torch.tensor([2.4 - 0.048, 3.2 - 0.064]))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(optimizer="nope"), "optimizer must be one of"),
        (dict(optimizer="sgd", optimizer_options={"bogus": 1}), "is refused by torch: SGD"),
        (dict(optimizer_options={"lr": 0.1}), "may not hold lr or params"),
        (dict(optimizer_options={"betas": {"a": 1}}), "optimizer_options must map option names"),
        (dict(clip_norm=-1.0), "clip_norm=-1.0 must be a finite number > 0"),
        (dict(lr=float("inf")), "lr must be > 0 and finite, got inf"),
        (
            dict(optimizer="sgd", optimizer_options={"momentum": float("nan")}),
            "the option 'momentum' of optimizer_options=.* must be finite, got nan",
        ),
        (
            dict(optimizer_options={"betas": [0.9, float("inf")]}),
            "the option 'betas' of optimizer_options=.* must be finite",
        ),
        (
            dict(scheduler="steplr", scheduler_options={"step_size": float("inf")}),
            "the option 'step_size' of scheduler_options=.* must be finite, got inf",
        ),
        (
            dict(scheduler="steplr", scheduler_options={"step_size": 2, "gamma": -5.0}, epochs=3),
            r"makes the learning rate -0.015 after epoch 2: it must stay a finite number >= 0",
        ),
        (
            dict(scheduler="exponentiallr", scheduler_options={"gamma": 1e200}, epochs=3),
            "makes the learning rate inf after epoch 2",
        ),
    ],
)
def test_bad_optimizer_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_a_scheduler_is_checked_over_the_epochs_of_the_run():
    """A schedule that turns bad only after the run's last epoch is not refused."""
    late = dict(scheduler="steplr", scheduler_options={"step_size": 3, "gamma": -1.0})
    assert TrainConfig(epochs=2, **late).epochs == 2
    with pytest.raises(ConfigError, match="after epoch 3"):
        TrainConfig(epochs=3, **late)


def test_a_run_with_sgd_and_clipping_resumes_bit_for_bit(tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = ["train", *SMALL, "--optimizer", "sgd", "--clip-norm", "50", "--lr", "0.01"]
    args += ["--optimizer-options", '{"momentum": 0.9}']
    assert main([*args, "--epochs", "3", "--out", str(whole)]) == 0
    state = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert main([*args, "--epochs", "2", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "3", "--quiet"]) == 0
    assert (part / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    # the optimizer is part of the run: it cannot change on resume
    assert main(["train", "--resume", str(part), "--epochs", "4", "--optimizer", "adam"]) == 2
    assert "--optimizer cannot change on --resume" in capsys.readouterr().err


def test_fit_clips_every_step_to_the_norm():
    from pyro_vae import fit
    from pyro_vae.models import VAE

    torch.manual_seed(0)
    model = VAE(6, 2, (8,))
    data = torch.bernoulli(torch.full((64, 6), 0.5))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(
        model,
        data,
        epochs=1,
        batch_size=64,
        lr=1.0,
        optimizer="sgd",
        clip_norm=1e-3,
        progress=False,
        final_particles=0,
    )  # one step of plain SGD
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # the gradient's norm is far above 1e-3: the step is cut to that length (float32 rounding)
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def _lr_history(run_dir):
    import json

    return json.loads((run_dir / "history.json").read_text())["lr"]


def test_a_step_schedule_halves_the_rate_and_resumes_bit_for_bit(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = ["train", *SMALL, "--lr", "0.004", "--scheduler", "steplr"]
    args += ["--scheduler-options", '{"step_size": 2, "gamma": 0.5}']
    assert main([*args, "--epochs", "5", "--out", str(whole)]) == 0
    assert _lr_history(whole) == [0.004, 0.004, 0.002, 0.002, 0.001]  # each epoch's own rate
    assert main([*args, "--epochs", "3", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "5", "--quiet"]) == 0
    assert _lr_history(part) == _lr_history(whole)
    assert (part / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_reduce_on_plateau_steps_on_the_held_out_elbo(tmp_path):
    # an improvement must be a millionfold (relative to the best, which starts at infinity):
    # no epoch improves, so with patience 0 every epoch halves the rate after it
    out = tmp_path / "run"
    options = '{"factor": 0.5, "patience": 0, "threshold": 1000000.0}'
    args = ["train", *SMALL, "--lr", "0.004", "--scheduler", "reducelronplateau"]
    assert main([*args, "--scheduler-options", options, "--epochs", "4", "--out", str(out)]) == 0
    assert _lr_history(out) == [0.004, 0.002, 0.001, 0.0005]


def test_scheduler_options_need_a_scheduler(capsys, tmp_path):
    with pytest.raises(ConfigError, match="scheduler_options are a scheduler's"):
        TrainConfig(scheduler_options={"gamma": 0.5})
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--scheduler", "steplr", "--out", str(out)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            "pyro-vae train: error: --scheduler steplr with --scheduler-options {} is refused by "
            "torch: StepLR"
        )
    )
    assert not out.exists()
