"""actcache.signals: SIGTERM raises KeyboardInterrupt inside the block only; the old handler comes back."""

from __future__ import annotations

import os
import signal
import time

import pytest

from actcache.signals import sigterm_as_interrupt


def test_sigterm_raises_keyboard_interrupt_inside_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the latest here
    assert signal.getsignal(signal.SIGTERM) == before
