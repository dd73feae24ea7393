"""The command line's help texts: plain text, a description per command, every default shown."""

import re
from pathlib import Path

import pytest

from pyro_vae.app.cli import main
from pyro_vae.infer import make_estimator
from pyro_vae.runs import EvalConfig
from pyro_vae.runs.config import ELBOS
from pyro_vae.util.errors import ConfigError

COMMANDS = ("train", "sample", "evaluate", "classify", "transfer", "bdmc")


def _help(capsys, monkeypatch, *argv):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping to undo
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _option_line(text, flag):
    """The entry of ``flag`` in the options list, its help joined onto one line."""
    entries = re.split(r"\n(?=  -)", text.split("\noptions:\n")[1])
    found = [entry for entry in entries if entry.lstrip().startswith(flag + " ")]
    assert len(found) == 1, text
    return " ".join(found[0].split())


def test_top_level_help_is_plain_text_and_names_every_command(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    description = text.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), text
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description(capsys, monkeypatch, command):
    text = _help(capsys, monkeypatch, command)
    description = text.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), text
    assert "``" not in text


def test_classify_batch_size_shows_its_default(capsys, monkeypatch):
    line = _option_line(_help(capsys, monkeypatch, "classify"), "--batch-size")
    assert f"(default {EvalConfig().batch_size})" in line


def test_importance_samples_help_names_every_estimator_that_takes_them(capsys, monkeypatch):
    line = _option_line(_help(capsys, monkeypatch, "train"), "--importance-samples")
    takes_them = []
    for name in ELBOS:
        try:
            make_estimator(name, num_particles=2, importance_samples=2)
        except (ConfigError, ValueError):
            continue
        takes_them.append(name)
    assert {"iwae", "dreg", "vimco"} <= set(takes_them)
    named = set(re.findall(r"\b(" + "|".join(ELBOS) + r")\b", line))
    assert named == set(takes_them), line


def test_the_docs_list_every_choice_of_a_flag(capsys, monkeypatch):
    """Where README.md or a docs page lists a flag's choices (``--elbo a|b|c``), it lists the
    command line's choices, all of them."""
    text = _help(capsys, monkeypatch, "train")
    choices = dict(re.findall(r"^\s+--([a-z-]+) \{([a-z0-9,]+)\}", text, re.M))
    root = Path(__file__).resolve().parents[2]
    listed = 0
    for page in [root / "README.md", *sorted((root / "docs").glob("*.rst"))]:
        words = " ".join(page.read_text(encoding="utf-8").replace("`", "").split())
        for flag, values in re.findall(r"--([a-z-]+) ([a-z0-9]+(?:\|[a-z0-9]+)+)", words):
            if flag in choices:
                listed += 1
                assert values.split("|") == choices[flag].split(","), (page.name, flag)
    assert listed >= 10
