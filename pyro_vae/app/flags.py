"""The command line's spelling of the library's Python parameters, in one table.

The library's errors name a Python parameter as ``name=value``: ``importance_samples=K``,
``elbo="dreg"``, ``force=True``, ``run_dir=DIR``. When the command line prints an error,
:func:`as_flags` rewrites each such mention of a parameter in :data:`FLAGS` into its flag:
``--importance-samples K``, ``--elbo dreg``, ``--force``, ``--out DIR``. A value of ``True``
is the flag alone, a quoted value loses its quotes; ``False`` and ``None`` (no flag says
them), names the table lacks and the arguments of a Python call quoted in the message
(``fit(model, data, run_dir=DIR, resume=True)``) are left as they are. A parameter named
without a value (``lr must be > 0``) becomes its flag where its name is no English word,
except in a message about a file read (``cannot read PATH: ...``, a config field
``config field lr ...``), which names that file's fields.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Python parameter -> the command line's flag (or the command that has it). The estimators'
#: ``max_plate_nesting`` and ``data_plate`` are the pair's own attributes: no flag sets them.
FLAGS = {
    "num_particles": "--particles",
    "particles": "--particles",
    "importance_samples": "--importance-samples",
    "elbo": "--elbo",
    "elbo_options": "--elbo-options",
    "beta": "--beta",
    "warmup": "--warmup",
    "epochs": "--epochs",
    "lr": "--lr",
    "patience": "--patience",
    "estimate_every": "--estimate-every",
    "log": "--log",
    "log_uri": "--log-uri",
    "optimizer": "--optimizer",
    "optimizer_options": "--optimizer-options",
    "clip_norm": "--clip-norm",
    "scheduler": "--scheduler",
    "scheduler_options": "--scheduler-options",
    "min_delta": "--min-delta",
    "binarize": "--binarize",
    "likelihood": "--likelihood",
    "guide": "--guide",
    "obs_scale": "--obs-scale",
    "device": "--device",
    "data_dir": "--data-dir",
    "download": "pyro-vae train --download",
    "dist_timeout": "--dist-timeout",
    "run_dir": "--out",
    "resume": "--resume RUN_DIR",
    "force": "--force",
    "model_factory": "--model-factory",
    "data": "--data",
    "test_data": "--test-data",
}

_MENTION = re.compile(
    r"(?<![\w.\-])(?P<name>[a-z_][a-z0-9_]*)="
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;:()\[\]]+?)"
    r"(?=[\s,;:()\[\]]|\.(?!\w)|$)"
)
#: the parameters a message may name alone (``lr must be > 0``, ``give test_data``): those
#: whose names are no English word (``lr``, the names with an underscore) and whose flag is a
#: plain option of every command that has it
_ALONE = {
    name: flag
    for name, flag in FLAGS.items()
    if (name == "lr" or "_" in name) and " " not in flag and name != "run_dir"
}
_NAME = re.compile(
    r"(?<![\w.\-/'\"])(?<!field )(?P<name>"
    + "|".join(sorted(_ALONE, key=len, reverse=True))
    + r")(?![\w\-/=]|\.\w)"
)
#: a Python call (one level of nested parentheses), whose keyword arguments stay Python
_CALL = re.compile(r"[A-Za-z_][\w.]*\((?:[^()]|\([^()]*\))*\)")


def _flag(match: re.Match) -> str:
    name, value = match["name"], match["value"]
    flag = FLAGS.get(name)
    if flag is None or value in ("False", "None"):
        return match[0]
    if value == "True":
        return flag
    if value[0] in "\"'":
        value = value[1:-1]
    return f"{flag} {value}"


def as_flags(text: str) -> str:
    """``text`` with every ``name=value`` of a parameter in :data:`FLAGS` in the command
    line's words: ``'use elbo="iwae", or num_particles=4'`` -> ``'use --elbo iwae, or
    --particles 4'``; so is a parameter named alone whose name is no English word: ``'lr must
    be > 0'`` -> ``'--lr must be > 0'``, ``'give test_data'`` -> ``'give --test-data'``."""
    alone = "cannot read " not in text  # a file's own fields (config.json's) stay as they are
    pieces, start = [], 0
    for call in _CALL.finditer(text):
        pieces += [_said(text[start : call.start()], alone), call[0]]
        start = call.end()
    return "".join([*pieces, _said(text[start:], alone)])


def _said(text: str, alone: bool) -> str:
    """``text``, outside a Python call, in flags: ``name=value``, and with ``alone`` a
    parameter named alone."""
    text = _MENTION.sub(_flag, text)
    return _NAME.sub(lambda match: _ALONE[match["name"]], text) if alone else text


def given_flags(args: object, names: Sequence[str]) -> str:
    """The flags of the parsed options ``names`` that were given (not ``None``) in ``args``, as
    the command line spells them, comma-separated: ``"--hidden, --latent-dim"``."""
    return ", ".join(
        "--" + name.replace("_", "-") for name in names if getattr(args, name, None) is not None
    )
