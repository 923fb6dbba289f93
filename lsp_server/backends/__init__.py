"""Where completions come from: a local diffusion engine or a remote FIM completions API.

`base` holds the Backend protocol and its job / outcome / error types; `local` and `remote`
build on it; `make_backend` picks one from the settings.
"""

from __future__ import annotations

from lsp_server.backends.base import (
    Backend,
    BackendError,
    CompletionJob,
    CompletionOutcome,
    HolesJob,
    HolesOutcome,
    NextEditJob,
    NextEditOutcome,
    estimate_tokens,
)
from lsp_server.backends.local import LocalBackend
from lsp_server.backends.remote import RemoteBackend
from lsp_server.settings import Settings

__all__ = ["Backend", "BackendError", "CompletionJob", "CompletionOutcome", "HolesJob",
           "HolesOutcome", "LocalBackend", "NextEditJob", "NextEditOutcome", "RemoteBackend",
           "estimate_tokens", "make_backend"]


def make_backend(settings: Settings) -> Backend:
    """The backend the settings ask for: `remote` or (the default) `local`."""
    if settings.backend == "remote":
        return RemoteBackend()
    return LocalBackend()
