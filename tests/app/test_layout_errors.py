"""Errors name Python parameters in the library and flags on the command line; count checks.

The library writes a parameter as ``name=value`` (``importance_samples=K``, ``elbo="dreg"``);
:func:`pyro_vae.app.flags.as_flags` turns it into the command line's flag when ``pyro-vae`` prints
the error. A scan of the package's ``raise`` statements keeps flags out of library errors.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from pyro_vae import ConfigError, ModelConfig, TrainConfig
from pyro_vae.app.cli import build_parser, main
from pyro_vae.app.flags import FLAGS, as_flags
from pyro_vae.data.batches import resolve_device
from pyro_vae.runs import open_run_folder
from pyro_vae.util.errors import check_count

PACKAGE = Path(__file__).resolve().parents[2] / "pyro_vae"
#: the command line's own layer, which speaks in flags
CLI_LAYER = PACKAGE / "app"
#: flags of other programs that a library error may name (torchrun's)
FOREIGN_FLAGS = {"--nproc-per-node"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# ------------------------------------------------------------------------------- check_count


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None])
def test_check_count_refuses_what_is_not_a_whole_number_of_at_least_one(value):
    with pytest.raises(ConfigError) as info:
        check_count("num_particles", value)
    assert str(info.value) == f"num_particles must be an integer >= 1, got {value!r}"


def test_check_count_returns_the_count_and_takes_a_minimum_and_none():
    assert check_count("num_particles", 3) == 3
    assert check_count("max_plate_nesting", 0, minimum=0) == 0
    assert check_count("max_plate_nesting", None, minimum=0, optional=True) is None
    with pytest.raises(
        ConfigError,
        match=r"^max_plate_nesting must be an integer >= 0 or None, "
        r"got -1$",
    ):
        check_count("max_plate_nesting", -1, minimum=0, optional=True)


def test_the_model_config_and_the_estimators_use_it():
    with pytest.raises(ConfigError, match=r"^pseudo_inputs must be an integer >= 1, got 2\.5$"):
        ModelConfig(family="vampprior", pseudo_inputs=2.5)
    with pytest.raises(
        ConfigError,
        match=r"^importance_samples must be an integer >= 1, "
        r"got False$",
    ):
        TrainConfig(elbo="iwae", importance_samples=False)


# --------------------------------------------------------------------------------- as_flags


@pytest.mark.parametrize(
    "python, cli",
    [
        (
            'use elbo="iwae" for importance samples, or num_particles=4 to average them',
            "use --elbo iwae for importance samples, or --particles 4 to average them",
        ),
        ("give importance_samples=K, K > 1", "give --importance-samples K, K > 1"),
        ("or give force=True to write", "or give --force to write"),
        (
            "Try a smaller learning rate than lr=1e+06.",
            "Try a smaller learning rate than --lr 1e+06.",
        ),
        ("choose another run_dir=DIR", "choose another --out DIR"),
        # a parameter named alone, where its name is no English word
        ("lr must be > 0, got -1.0", "--lr must be > 0, got -1.0"),
        ("so importance_samples must be 1 (got 3)", "so --importance-samples must be 1 (got 3)"),
        ("give test_data (early stopping", "give --test-data (early stopping"),
        ("scheduler_options are a scheduler's", "--scheduler-options are a scheduler's"),
        (
            "cannot read run/config.json: lr must be > 0",
            "cannot read run/config.json: lr must be > 0",
        ),
        ("config field lr must be a finite number", "config field lr must be a finite number"),
        (
            "in /tmp/test_data.npz, model.lr_scale or 'lr'",
            "in /tmp/test_data.npz, model.lr_scale or 'lr'",
        ),
        # left alone: no flag says False or None, unknown names, dotted names, torchrun's flags,
        # and the keyword arguments of a Python call quoted in the message
        ("download=False, obs_scale=None", "download=False, obs_scale=None"),
        ("data_plate='data', model.elbo=3", "data_plate='data', model.elbo=3"),
        ("torchrun --nproc-per-node=2", "torchrun --nproc-per-node=2"),
        (
            "fit(Pair(...), data, run_dir='runs/x', resume=True) or resume=True",
            "fit(Pair(...), data, run_dir='runs/x', resume=True) or --resume RUN_DIR",
        ),
    ],
)
def test_parameters_become_flags(python, cli):
    assert as_flags(python) == cli


def _options() -> set[str]:
    """Every option string of every ``pyro-vae`` command, read from its help."""
    options = set()
    for command in ("train", "sample", "evaluate", "classify", "transfer", "bdmc"):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        options |= set(FLAG.findall(text.getvalue()))
    return options


def test_every_flag_of_the_table_is_an_option_of_the_command_line():
    options = _options()
    for name, flag in FLAGS.items():
        assert set(FLAG.findall(flag)) <= options and FLAG.findall(flag), (name, flag)


# ----------------------------------------- the same mistake from Python and on the command line


def test_a_gaussian_scale_without_the_gaussian_likelihood(capsys):
    with pytest.raises(ConfigError, match='it needs likelihood="gaussian"$'):
        ModelConfig(obs_scale=0.1)
    assert exit_status(["train", "--obs-scale", "0.1"]) == 2
    assert one_line(capsys).endswith("it needs --likelihood gaussian")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lr", "-1"], "error: --lr must be > 0 and finite, got -1.0"),
        (["--obs-scale", "-1", "--likelihood", "gaussian"], "error: --obs-scale must be > 0"),
        (["--scheduler-options", '{"gamma": 0.5}'], "error: --scheduler-options are a scheduler's"),
    ],
)
def test_a_parameter_named_alone_is_its_flag(tmp_path, capsys, argv, expected):
    with pytest.raises(ConfigError, match="^lr must be > 0"):
        TrainConfig(lr=-1.0)
    assert exit_status(["train", *argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert expected in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError,
        match=r"choose a new or empty run_dir=DIR, or give force=True "
        r"to write the run among them$",
    ):
        with open_run_folder(tmp_path, TrainConfig()):
            pass
    assert exit_status(["train", "--out", str(tmp_path), "--epochs", "1", "--quiet"]) == 2
    assert one_line(capsys).endswith(
        "choose a new or empty --out DIR, or give --force to write the run among them"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cuda_asked_for_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match='^device="cuda" was requested but no CUDA GPU'):
        resolve_device("cuda")
    out = tmp_path / "run"
    assert exit_status(["train", "--device", "cuda", "--out", str(out), "--quiet"]) == 2
    assert one_line(capsys) == (
        "pyro-vae train: error: --device cuda was requested but no CUDA GPU is available"
    )
    assert not out.exists()


# ------------------------------------------------------------------- no flags in library errors


def _texts(node: ast.AST) -> list[tuple[int, str]]:
    return [
        (sub.lineno, sub.value)
        for sub in ast.walk(node)
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
    ]


def _message_parts(tree: ast.AST) -> list[tuple[int, str]]:
    """The string literals of the module's ``raise`` statements, and of the advice its errors
    take from elsewhere (a name or function with ``hint`` in it)."""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            parts += _texts(node.exc)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any("hint" in ast.unparse(target) for target in targets) and node.value:
                parts += _texts(node.value)
        elif isinstance(node, ast.FunctionDef) and "hint" in node.name:
            parts += [
                part
                for ret in ast.walk(node)
                if isinstance(ret, ast.Return) and ret.value
                for part in _texts(ret.value)
            ]
    return parts


def _library_flags() -> dict[str, list[str]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if CLI_LAYER in path.parents:
            continue
        hits = [
            f"line {line}: {flag}"
            for line, text in _message_parts(ast.parse(path.read_text()))
            for flag in FLAG.findall(text)
            if flag not in FOREIGN_FLAGS
        ]
        if hits:
            found[path.relative_to(PACKAGE).as_posix()] = hits
    return found


def test_library_errors_name_python_parameters_not_flags():
    """A library error names ``importance_samples=K``, not ``--importance-samples K``: the
    command line adds its flags (:mod:`pyro_vae.app.flags`)."""
    found = _library_flags()
    assert found == {}


def test_the_scan_finds_a_flag_in_a_raise_and_in_a_hint():
    tree = ast.parse(
        'def f():\n    raise ValueError(f"give --particles {n}")\n'
        'class E:\n    importance_hint = "use --elbo iwae"\n'
        'def _divergence_hint():\n    return "lower --lr"\n'
        'def g():\n    """The ``--data`` of the command line."""\n'
    )
    flags = [flag for _, text in _message_parts(tree) for flag in FLAG.findall(text)]
    assert sorted(flags) == ["--elbo", "--lr", "--particles"]
