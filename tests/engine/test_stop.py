"""engine.stop: the first Ctrl-C / SIGTERM asks to stop, a second stops at once, and handlers
the application installed itself are left alone. Real signals, sent to this process."""

import os
import signal
import time

import pytest

from ddetr_cli.engine.stop import Interrupted, StopRequest, exit_code


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_first_signal_requests_second_raises(sig):
    seen = []
    with StopRequest(on_request=seen.append) as stop:
        _deliver(sig)
        assert stop.requested and stop.signum == sig and seen == [sig]
        with pytest.raises(Interrupted) as e:
            _deliver(signal.SIGINT)
        assert exit_code(e.value) == 128 + sig  # the signal that asked first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_applications_own_handler_is_kept():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with StopRequest() as stop:
            _deliver(signal.SIGTERM)
            assert not stop.requested and got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_exit_code_of_a_plain_keyboard_interrupt_is_130():
    assert exit_code(KeyboardInterrupt()) == 130
