"""The engine on models and data written only here: a factor-analysis pair on a NumPy array, a
padded sequence model with a mask fed by a user's collate function, and a pair taking (x, y)
keyword arguments; through ``fit``, the evaluator and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from user_models import (
    FactorAnalysis,
    LinearSequenceModel,
    Regression,
    Sequences,
    fa_data,
    pad_collate,
    regression_data,
)

from pyro_vae import ConfigError, TrainConfig, as_source, check_model, fit, load_run
from pyro_vae.app.cli import EXIT_USER_ERROR, main
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.util.errors import DataError

USER_MODELS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"
FA_TOLERANCE = 0.02  # nats per datapoint


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_factor_analysis_on_a_numpy_array_reaches_the_maximum_likelihood_fit():
    """A linear-Gaussian pair whose guide can hold the exact posterior: maximizing the ELBO is
    maximum likelihood, so the exact log-likelihood of the trained pair comes within
    FA_TOLERANCE nats per datapoint of scikit-learn's FactorAnalysis (EM to convergence)."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    x = fa_data()
    reference = SkFA(n_components=2, tol=1e-5, max_iter=20000).fit(x).score(x)
    model = FactorAnalysis()
    result = fit(
        model,
        x,
        epochs=400,
        batch_size=400,
        lr=0.05,
        particles=16,
        final_particles=0,
        progress=False,
    )
    exact = model.exact_log_likelihood(torch.as_tensor(x)).mean().item()
    assert reference - FA_TOLERANCE <= exact <= reference + 1e-3, (exact, reference)
    assert len(result.history.epoch) == 400 and result.history.test_elbo == []
    with torch.no_grad():
        scored = evaluate_dataset(model.model, model.guide, x, num_particles=200)
    assert scored.log_px.mean().item() == pytest.approx(exact, abs=FA_TOLERANCE)


def test_a_float64_pair_trains_on_float32_data():
    model = FactorAnalysis(dtype=torch.float64)
    result = fit(
        model,
        fa_data(40),
        test_data=fa_data(20, seed=1),
        epochs=2,
        batch_size=16,
        final_particles=5,
        progress=False,
    )
    assert np.isfinite(result.history.test_elbo).all()
    assert np.isfinite(result.history.extra["final"]["test_log_px"])


def test_a_padded_sequence_scored_alone_equals_it_scored_in_a_padded_batch():
    """With the exact posterior as guide every log-weight is log p(x) of the real steps: the
    padding and the other sequences of the batch change nothing."""
    model = LinearSequenceModel()
    data = Sequences(12)
    with torch.no_grad():
        batched = evaluate_dataset(
            model.model, model.guide, data, collate_fn=pad_collate, num_particles=4, batch_size=6
        )
        alone = [
            evaluate_dataset(
                model.model, model.guide, Subset(data, [i]), collate_fn=pad_collate, num_particles=4
            ).log_px
            for i in range(len(data))
        ]
        exact = model.exact_log_likelihood(**pad_collate(list(data.items)))
    assert torch.allclose(batched.log_px, torch.cat(alone), atol=1e-4)
    assert torch.allclose(batched.log_px, exact.double(), atol=1e-4)
    assert torch.allclose(batched.gap, torch.zeros(len(data), dtype=torch.float64), atol=1e-4)


def test_a_sequence_model_fed_by_a_users_loader_trains_and_resumes_exactly(tmp_path):
    loader = DataLoader(Sequences(40), batch_size=8, shuffle=True, collate_fn=pad_collate)
    held_out = DataLoader(Sequences(10, seed=1), batch_size=8, collate_fn=pad_collate)
    options = dict(test_data=held_out, epochs=3, lr=0.05, final_particles=10, progress=False)
    torch.manual_seed(0)
    full = fit(LinearSequenceModel(), loader, run_dir=tmp_path / "full", **options)
    assert full.history.test_elbo[-1] > full.history.test_elbo[0]
    fit(LinearSequenceModel(), loader, run_dir=tmp_path / "part", **{**options, "epochs": 1})
    resumed = fit(LinearSequenceModel(), loader, run_dir=tmp_path / "part", resume=True, **options)
    _same_weights(full.model, resumed.model)
    assert resumed.history.to_dict()["train_loss"] == full.history.train_loss
    assert resumed.history.extra["final"] == full.history.extra["final"]


def test_keyword_data_reach_the_pair_by_name():
    """A dict of tensors is keyword arguments: the same run as the tuple in argument order."""
    data = regression_data()
    runs = []
    for form in (data, (data["x"], data["y"])):
        torch.manual_seed(0)
        runs.append(
            fit(
                Regression(),
                form,
                test_data=form,
                epochs=3,
                batch_size=50,
                final_particles=5,
                progress=False,
                lr=0.02,
            )
        )
    _same_weights(runs[0].model, runs[1].model)
    assert runs[0].history.to_dict() == {
        **runs[1].history.to_dict(),
        "seconds": runs[0].history.seconds,
    }
    assert runs[0].history.test_elbo[-1] > runs[0].history.test_elbo[0]


def test_a_dataset_and_the_loader_built_on_it_train_the_same():
    x = torch.as_tensor(fa_data(64))
    runs = []
    for data in (TensorDataset(x), DataLoader(TensorDataset(x), batch_size=16, shuffle=True)):
        torch.manual_seed(0)
        runs.append(
            fit(
                FactorAnalysis(), data, epochs=2, batch_size=16, final_particles=0, progress=False
            ).model
        )
    _same_weights(*runs)


def test_an_unsized_data_plate_and_a_differently_named_plate():
    class Unsized(FactorAnalysis):
        def model(self, x):
            with pyro.plate("data"):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, 1.0).to_event(1), obs=x)

    x = torch.as_tensor(fa_data(8))
    check_model(Unsized(), x)
    fit(Unsized(), x, epochs=1, final_particles=0, progress=False)

    class Renamed(FactorAnalysis):
        def model(self, x):
            with pyro.plate("rows", x.shape[0]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, 1.0).to_event(1), obs=x)

        def guide(self, x):
            with pyro.plate("rows", x.shape[0]):
                pyro.sample("z", dist.Normal(x @ self.A.T + self.b, 1.0).to_event(1))

    check_model(Renamed(), x)  # the one plate holding every site, as the estimators find it
    renamed = Renamed()
    renamed.data_plate = "data"
    with pytest.raises(ConfigError, match="in plate 'rows': set data_plate = 'rows' on the"):
        check_model(renamed, x)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "different lengths"),
        (np.array(["a", "b"]), "not numeric"),
        ({"1x": np.zeros(3)}, "not argument names"),
        (np.zeros((0, 3)), "at least one datapoint"),
        (object(), "cannot train or evaluate on a object"),
    ],
)
def test_unusable_data_are_refused_in_one_line(data, message):
    with pytest.raises(DataError, match=message):
        as_source(data)


def test_data_and_a_builtin_dataset_together_are_refused():
    with pytest.raises(ConfigError, match="both data and the built-in dataset"):
        fit(FactorAnalysis(), fa_data(8), config=TrainConfig(), progress=False)
    with pytest.raises(ConfigError, match="unknown option"):
        fit(FactorAnalysis(), fa_data(8), epoch=3, progress=False)


def _cli(*argv: str) -> int:
    return main([*argv, "--quiet"] if argv[0] == "train" else list(argv))


def test_the_command_line_trains_evaluates_and_resumes_a_users_pair(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "train.npz", x=fa_data(60))
    np.savez(tmp_path / "test.npz", fa_data(30, seed=1))
    common = [
        "--model-factory",
        f"{USER_MODELS}:make_fa",
        "--data",
        "train.npz",
        "--test-data",
        "test.npz",
        "--batch-size",
        "20",
        "--device",
        "cpu",
    ]
    assert _cli("train", *common, "--epochs", "3", "--out", "full") == 0
    assert _cli("train", *common, "--epochs", "1", "--out", "part") == 0
    capsys.readouterr()
    assert _cli("train", "--resume", "part", "--epochs", "3") == 0
    assert "run written to part" in capsys.readouterr().out
    full, part = load_run("full", device="cpu"), load_run("part", device="cpu")
    _same_weights(full.model, part.model)
    assert full.history.train_loss == part.history.train_loss
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "train.npz") and config["model"] is None

    monkeypatch.chdir(tmp_path / "full")  # the recorded specs are absolute
    assert main(["evaluate", str(tmp_path / "part"), "--particles", "25", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "30 datapoints, K = 25 particles" in out
    assert (
        main(
            ["evaluate", str(tmp_path / "part"), "--split", "train", "--particles", "3", "--quiet"]
        )
        == 0
    )
    assert "60 datapoints" in capsys.readouterr().out

    # other data: their own files beside the split's, which stay as they were
    before = (tmp_path / "part" / "eval-test.json").read_bytes()
    np.savez(tmp_path / "other.npz", fa_data(12, seed=4))
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "part"),
                "--data",
                str(tmp_path / "other.npz"),
                "--particles",
                "5",
                "--quiet",
            ]
        )
        == 0
    )
    assert "12 datapoints" in capsys.readouterr().out
    written = json.loads((tmp_path / "part" / "eval-data-other.json").read_text())
    assert written["data"] == str(tmp_path / "other.npz")
    assert (tmp_path / "part" / "eval-test.json").read_bytes() == before
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "part"),
                "--data",
                str(tmp_path / "other.npz"),
                "--ais",
                "--ais-steps",
                "2",
                "--chains",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "part" / "ais-data-other.json").is_file()
    assert not (tmp_path / "part" / "ais-test.json").exists()


def test_the_command_line_takes_a_function_returning_train_and_test_loaders(tmp_path, capsys):
    out = tmp_path / "seq"
    assert (
        _cli(
            "train",
            "--model-factory",
            f"{USER_MODELS}:make_sequence_model",
            "--data",
            f"{USER_MODELS}:sequence_data",
            "--epochs",
            "2",
            "--out",
            str(out),
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "test ELBO" in printed and "test log p_K(x)" in printed
    assert (out / "curves.png").is_file() and not (out / "samples.png").exists()
    assert main(["evaluate", str(out), "--particles", "4", "--quiet"]) == 0
    assert "20 datapoints" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "x.npz"], "--data and --test-data need --model-factory"),
        (["--model-factory", f"{USER_MODELS}:make_fa", "--data", "missing.npz"], "no data file"),
        (
            ["--model-factory", f"{USER_MODELS}:make_fa", "--data", "x.npz", "--latent-dim", "3"],
            "--latent-dim describe(s) the built-in model",
        ),
        (
            ["--model-factory", f"{USER_MODELS}:make_fa", "--data", "x.npz", "--dataset", "digits"],
            "--dataset appl(ies) to the built-in images",
        ),
        (["--model-factory", f"{USER_MODELS}:nothing", "--data", "x.npz"], "has no callable"),
    ],
)
def test_the_command_line_refuses_bad_user_runs_in_one_line(
    tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "x.npz", x=fa_data(10))
    assert _cli("train", *argv, "--out", "run") == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


class PackedSequenceModel(LinearSequenceModel):
    """The same pair taking a PackedSequence, as an RNN-based model would."""

    def model(self, packed):
        super().model(*self.unpack(packed))

    def guide(self, packed):
        super().guide(*self.unpack(packed))

    @staticmethod
    def unpack(packed):
        from torch.nn.utils.rnn import pad_packed_sequence

        x, lengths = pad_packed_sequence(packed, batch_first=True)
        return x, torch.arange(x.shape[1])[None, :] < lengths[:, None]


def test_a_batch_holding_a_packed_sequence_is_evaluated_like_its_padded_twin():
    from torch.nn.utils.rnn import pack_sequence

    model, data = PackedSequenceModel(), Sequences(10)
    with torch.no_grad():
        packed = evaluate_dataset(
            model.model,
            model.guide,
            data,
            num_particles=3,
            batch_size=4,
            collate_fn=lambda items: pack_sequence(items, enforce_sorted=False),
        )
        padded = evaluate_dataset(
            LinearSequenceModel().model,
            LinearSequenceModel().guide,
            data,
            num_particles=3,
            batch_size=4,
            collate_fn=pad_collate,
        )
    assert packed.num_datapoints == 10
    torch.testing.assert_close(packed.log_px, padded.log_px, rtol=0, atol=1e-4)


def make_randomly_started_fa() -> FactorAnalysis:
    """Factor analysis whose loadings start from torch's global random state."""
    pair = FactorAnalysis()
    with torch.no_grad():
        pair.W.normal_(0.0, 0.1)
    return pair


def test_a_factory_pair_is_built_after_the_seed_is_set(tmp_path):
    """--model-factory: the pair is built after the run's seed is set, so its initial weights
    follow --seed; the run equals fit() on a pair built right after pyro.set_rng_seed(seed)."""
    np.savez(tmp_path / "train.npz", x=fa_data(60))
    data = {"x": torch.as_tensor(fa_data(60))}
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        torch.manual_seed(123)  # whatever the state before: the run's seed decides
        assert (
            _cli(
                "train",
                "--model-factory",
                f"{__file__}:make_randomly_started_fa",
                "--data",
                str(tmp_path / "train.npz"),
                "--epochs",
                "1",
                "--batch-size",
                "20",
                "--seed",
                str(seed),
                "--device",
                "cpu",
                "--out",
                str(out),
            )
            == 0
        )
        pyro.set_rng_seed(seed)
        pair = make_randomly_started_fa()
        fit(pair, data, epochs=1, batch_size=20, seed=seed, device="cpu", progress=False)
        runs.append(load_run(out, device="cpu").model)
        _same_weights(runs[-1], pair)
    assert not torch.equal(runs[0].W, runs[1].W)
