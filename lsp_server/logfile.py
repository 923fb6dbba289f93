"""The server's log file, which never takes the server down: a full disk (or a file that
becomes unwritable) moves logging to stderr with one line saying why, and the server tells the
user once. The stock `logging.FileHandler` would print a "--- Logging error ---" traceback to
stderr for every record instead."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class FallbackFileHandler(logging.FileHandler):
    """A file handler that, on the first OSError while writing, closes the file and writes every
    later record (the failed one included) to stderr. `failure` holds the one-line reason;
    `on_failure(reason)` is called once, from whichever thread logged."""

    def __init__(self, path: str, on_failure: Callable[[str], None] | None = None) -> None:
        super().__init__(path, encoding="utf-8")
        self.failure: str | None = None
        self.on_failure = on_failure
        self._fallback = logging.StreamHandler(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)  # calls handleError on failure, with the error being handled
        if self.failure is not None:
            self._fallback.emit(record)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        super().setFormatter(fmt)
        self._fallback.setFormatter(fmt)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = sys.exc_info()[1]
        if not isinstance(error, OSError) or self.failure is not None:
            super().handleError(record)
            return
        reason = error.strerror or str(error)
        self.failure = (f"cannot write the log file {self.baseFilename} ({reason}); "
                        "logging to stderr instead")
        self._close_quietly()
        self._fallback.stream.write(f"{self.failure}\n")
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def _close_quietly(self) -> None:
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is None:
            return
        with contextlib.suppress(OSError):  # closing flushes: fails again on a full disk
            stream.close()


def make_handler(log_file: str | None,
                 on_failure: Callable[[str], None] | None = None) -> logging.Handler:
    """The handler for `serve`: the log file when one is given, else stderr (never stdout,
    which carries the protocol)."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file:
        try:
            handler = FallbackFileHandler(log_file, on_failure)
        except OSError as error:  # no such folder, no permission: the server starts anyway
            reason = (f"cannot open the log file {log_file} ({error.strerror or error}); "
                      "logging to stderr instead")
            sys.stderr.write(f"{reason}\n")
            if on_failure is not None:
                on_failure(reason)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler
