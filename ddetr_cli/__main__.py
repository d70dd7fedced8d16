"""``python -m ddetr_cli`` and the ``ddetr`` command. Ctrl-C while the CLI's own modules load
(typer, rich: a few hundred ms on a busy machine) exits 130 quietly, as it does later."""

import sys

from ddetr_cli.ops.process import configure  # imports no torch

# idle OpenMP threads sleep, large tensors on huge pages, freed memory kept: before torch loads
# (see ddetr_cli/ops/process.py); a user's own settings win
configure()


def run() -> None:
    try:
        from ddetr_cli.cli.main import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
