"""One log line when a background loop loses a dependency and one when it has it back, instead
of a traceback on every tick of the outage.

A loop that retries on its own (the event runner, quote housekeeping, the calibrator, the leader
lease) hands each failure to :meth:`OutageLog.failed`: a lost database, state store or broker
(``devices.outages.dependency_down``) is logged once, as a warning naming the dependency, and
``failed`` answers True; anything else is a bug and answers False, so the caller logs its
traceback as before. :meth:`OutageLog.recovered` after a pass that did its work logs the end of
each outage with its length.
"""

from __future__ import annotations

import logging
import time

from devices.outages import dependency_down


class OutageLog:
    """``OutageLog(log, "event runner")``; ``failed(exc)`` in the loop's handler,
    ``recovered()`` after a pass that worked."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log = logger
        self.what = what
        self.down: dict[str, float] = {}  # dependency → monotonic time its outage began
        self.outages = 0  # outages seen so far (tests, diagnostics)

    def failed(self, exc: BaseException, dependency: str | None = None) -> bool:
        """True if ``exc`` is a lost dependency (logged once per outage); False for a bug.
        ``dependency``: the one the caller knows it was waiting on (a call to it timed out)."""
        dependency = dependency or dependency_down(exc)
        if dependency is None:
            return False
        if dependency not in self.down:
            self.down[dependency] = time.monotonic()
            self.outages += 1
            self.log.warning(
                "%s: %s unreachable (%s); retrying until it is back",
                self.what,
                dependency,
                _short(exc),
            )
        return True

    def recovered(self) -> None:
        """Log the end of every outage still open (a pass has just succeeded)."""
        if not self.down:
            return
        now = time.monotonic()
        for dependency, since in self.down.items():
            self.log.warning("%s: %s back after %.1f s", self.what, dependency, now - since)
        self.down.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
