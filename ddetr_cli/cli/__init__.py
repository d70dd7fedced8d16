"""The ``ddetr`` command line: a thin Typer layer over ``ddetr_cli.engine``."""

from ddetr_cli.cli.main import app, main

__all__ = ["app", "main"]
