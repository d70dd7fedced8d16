"""Stopping a long run on Ctrl-C or SIGTERM at a safe point (a step or image boundary).

SIGTERM is what schedulers and service managers send before they kill; treating it as Ctrl-C
lets a preempted run keep what it did. The first signal only asks to stop, so the loop finishes
the unit of work under way and its outputs stay consistent; a second one raises at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A run that stopped on a signal after saving its work; ``signum``: the signal (the exit
    code is ``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def exit_code(e: BaseException) -> int:
    """The shell's exit code for a run ended by ``e`` (an interrupt): 128 + the signal."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


class StopRequest:
    """While entered (main thread): the first SIGINT or SIGTERM sets ``requested`` (and
    ``signum``); a second raises KeyboardInterrupt at once. Only signals left at Python's
    defaults are taken over, so an application's own handlers win. ``notice``: a line written to
    stderr on the first signal (None: silent); ``on_request(signum)``: called on the first signal
    (to wake threads that wait on something other than ``requested``)."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, notice: str | None = None, on_request: Callable[[int], None] | None = None) -> None:
        self.requested = False
        self.on_request = on_request
        self.signum = signal.SIGINT
        self.notice = notice
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig, default in self.DEFAULTS.items():
                if signal.getsignal(sig) is default:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted("stopped at once", self.signum)
        self.requested, self.signum = True, signum
        if self.notice:  # os.write: safe whatever the interrupted code was printing
            os.write(2, f"\n{self.notice}\n".encode())
        if self.on_request is not None:
            self.on_request(signum)
