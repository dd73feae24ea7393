"""The smallest training run of the command line, for tests that need a finished run folder
(the fixtures ``trained_run``, trained once per test module, and ``run_dir``, a copy of it per
test, are in ``conftest.py``)."""

TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "512",
    "--latent-dim",
    "2",
    "--hidden",
    "8",
    "--device",
    "cpu",
    "--quiet",
]
