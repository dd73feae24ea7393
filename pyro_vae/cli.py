"""The command line from Python, at the name it has always had: ``pyro_vae.cli.main(argv)`` runs
``pyro-vae`` with ``argv`` and returns its exit status (the parser lives in
:mod:`pyro_vae.app.cli`); ``python -m pyro_vae.cli`` is ``python -m pyro_vae``."""

from pyro_vae.app.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    from pyro_vae.app.launch import run

    run()
