"""A background thread that calls a function every ``interval_s`` (the actors' tick loops)."""

from __future__ import annotations

import threading
import time
from typing import Callable


class Ticker:
    """``fn()`` every ``interval_s`` in a daemon thread named ``name`` until :meth:`stop`.

    An exception from ``fn`` goes to ``on_error`` (default: re-raised, which ends the
    thread); the next round starts ``interval_s`` after the previous one started.
    """

    def __init__(self, fn: Callable[[], object], name: str,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.fn, self.name, self.on_error = fn, name, on_error
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, interval_s: float) -> bool:
        """Start ticking (idempotent: False if already running)."""
        if self._thread is not None and self._thread.is_alive():
            return False

        def loop() -> None:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    self.fn()
                except Exception as e:
                    if self.on_error is None:
                        raise
                    self.on_error(e)
                self._stop.wait(max(0.0, interval_s - (time.monotonic() - t)))

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
