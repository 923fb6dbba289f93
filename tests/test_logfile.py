"""The server's log file on a full disk or in a folder that does not exist: logging moves to
stderr with one line saying why, and the server is told once."""

from __future__ import annotations

import logging

from lsp_server.logfile import FallbackFileHandler, make_handler


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test-logfile-{id(handler)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_full_disk_moves_logging_to_stderr_once(capsys):
    told: list[str] = []
    handler = make_handler("/dev/full", told.append)
    assert isinstance(handler, FallbackFileHandler)
    logger = _logger(handler)
    for index in range(3):
        logger.warning("record %d", index)
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count("cannot write the log file /dev/full (No space left on device)") == 1
    assert all(f"record {index}" in err for index in range(3))  # none lost
    assert len(told) == 1 and "/dev/full" in told[0]
    handler.close()


def test_a_log_file_that_cannot_be_opened_falls_back_at_once(tmp_path, capsys):
    told: list[str] = []
    handler = make_handler(str(tmp_path / "no-such-folder" / "server.log"), told.append)
    _logger(handler).warning("still logged")
    err = capsys.readouterr().err
    assert "cannot open the log file" in err and "still logged" in err
    assert len(told) == 1


def test_a_writable_log_file_is_used(tmp_path):
    path = tmp_path / "server.log"
    handler = make_handler(str(path))
    _logger(handler).warning("into the file")
    handler.close()
    assert "into the file" in path.read_text()
