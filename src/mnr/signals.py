"""Stopping a run: SIGINT and SIGTERM stop it after the current step, with a checkpoint; during work a checkpoint
cannot keep (loading, mining, an evaluation) they stop it there and then."""

from __future__ import annotations

import contextlib
import signal

from tqdm.auto import tqdm


class StopNow(Exception):
    """A stop signal that arrived inside ``StopSignals.at_once()``."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.signal = number


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (and write a checkpoint).
    Inside ``at_once()`` (loading, mining, an evaluation: minutes of work that a checkpoint cannot keep)
    they raise ``StopNow`` there and then (unless ``at_once`` is False: then it is a no-op). A second
    Ctrl-C stops at once."""

    def __init__(self, at_once: bool = True):
        self.signal: int | None = None
        self.previous: dict = {}
        self.immediate = False
        self.allowed = at_once

    @contextlib.contextmanager
    def at_once(self):
        if not self.allowed:
            yield
            return
        if self.signal is not None:  # asked before this work began
            raise StopNow(self.signal)
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def _handle(self, number, frame):
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = number
        if self.immediate:
            self.immediate = False
            raise StopNow(number)
        tqdm.write(f"{signal.Signals(number).name}: stopping after this step and writing a checkpoint "
                   "(Ctrl-C again to stop at once)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
