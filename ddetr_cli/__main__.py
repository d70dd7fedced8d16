"""``python -m ddetr_cli`` and the ``ddetr`` command. Ctrl-C while the CLI's own modules load
(typer, rich: a few hundred ms on a busy machine) exits 130 quietly, as it does later."""

import os
import sys

# OpenMP threads that finish a parallel region spin-wait for the next one by default. On a CPU
# that other work shares (a labeler's laptop, a CI runner, a camera box) a spinning thread holds
# the core the straggler needs, and every one of a forward pass's hundreds of regions waits for
# the scheduler: the demo model ran 3-8x slower on a loaded 2-core VM. Sleeping threads cost a
# wake-up per region instead. Read once, when torch loads OpenMP, so it is set before any import;
# a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def run() -> None:
    try:
        from ddetr_cli.cli.main import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
