"""The command line's spelling of the library's Python parameters, in one table.

The library's errors name a Python parameter as ``name=value``: ``importance_samples=K``,
``elbo="dreg"``, ``force=True``, ``run_dir=DIR``. When the command line prints an error,
:func:`as_flags` rewrites each such mention of a parameter in :data:`FLAGS` into its flag:
``--importance-samples K``, ``--elbo dreg``, ``--force``, ``--out DIR``. A value of ``True``
is the flag alone, a quoted value loses its quotes; ``False`` and ``None`` (no flag says
them), names the table lacks and the arguments of a Python call quoted in the message
(``fit(model, data, run_dir=DIR, resume=True)``) are left as they are.
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
    --particles 4'``."""
    pieces, start = [], 0
    for call in _CALL.finditer(text):
        pieces += [_MENTION.sub(_flag, text[start : call.start()]), call[0]]
        start = call.end()
    return "".join([*pieces, _MENTION.sub(_flag, text[start:])])


def given_flags(args: object, names: Sequence[str]) -> str:
    """The flags of the parsed options ``names`` that were given (not ``None``) in ``args``, as
    the command line spells them, comma-separated: ``"--hidden, --latent-dim"``."""
    return ", ".join(
        "--" + name.replace("_", "-") for name in names if getattr(args, name, None) is not None
    )
