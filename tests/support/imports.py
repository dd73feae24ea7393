"""What a fresh interpreter imports: for the tests that an optional package stays unimported."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def top_level_modules_after(statements: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` (top-level names) in ``sys.modules`` after a new Python
    process, started in the repository with it on the path, runs ``statements``."""
    code = (
        f"import json, sys\n{statements}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout)
