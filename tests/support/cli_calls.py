"""The command line called in the test's own process: its exit status, and its one error line."""

from pyro_vae.app.cli import main


def status(argv) -> int:
    """``pyro-vae ARGV``'s exit status (argparse's refusals exit by ``SystemExit``)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def one_line(capsys) -> str:
    """The one non-blank line a refused command printed to stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]
