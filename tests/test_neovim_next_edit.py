"""Next edits in a real Neovim (headless) with the plugin and the real server, whose remote
backend speaks Inception's edit contract to a STAND-IN (tests/test_server_next_edit.py) that
propagates a rename. The driver renames a parameter with real keys, then: the first suggestion
(away from the cursor) is drawn as virtual lines, Tab jumps there, Tab applies it; the second is
dismissed with Esc; asked again on its own line, it is ghost text and Tab applies it. The
server's stats count what the plugin reported."""

from __future__ import annotations

import json
import sys

import pytest

from tests.edit_standin import SOURCE, standin_in_a_thread
from tests.neovim_helpers import DRIVER, fill, run_nvim
from tests.remote_standin import KEY

SCENARIO = """
local plugin = require("diffusion_lsp")
local nes = require("diffusion_lsp.nes")
plugin.setup({
  cmd = { @python@, "-m", "diffusion_lsp", "serve" },
  settings = { backend = "remote", remote = { url = @url@, api = "mercury", apiKey = @key@ } },
  nes = { debounce_ms = 20 },
})
local function marks()
  local ns = vim.api.nvim_get_namespaces()["diffusion_lsp.nes"]
  local out = {}
  for _, m in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
    local d = m[4]
    out[#out + 1] = { row = m[2], col = m[3], hl = d.hl_group,
      virt_text = d.virt_text and d.virt_text[1][1], pos = d.virt_text_pos,
      virt_lines = d.virt_lines and d.virt_lines[1][1][1] or nil }
  end
  return out
end
local function stats()
  local client = plugin.clients()[1]
  return plugin.call(client, "request_sync", "diffusion/stats", vim.NIL, 3000, 0).result
end
local function tab() vim.api.nvim_feedkeys(vim.keycode("<Tab>"), "m", false) end
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  poll(function() return (plugin.last_status or {}).state == "ready" or nil end, function()
    vim.api.nvim_win_set_cursor(0, { 1, 9 })
    vim.api.nvim_feedkeys("ciww" .. vim.keycode("<Esc>"), "n", false)  -- width -> w
    poll(nes.shown, function(first)
      seen.first = { row = first.row, inline = first.inline, marks = marks() }
      tab()  -- jump
      poll(function()
        local c = vim.api.nvim_win_get_cursor(0)
        return c[1] == first.row + 1 or nil
      end, function()
        seen.jumped = vim.api.nvim_win_get_cursor(0)
        local before = lines()
        tab()  -- apply
        poll(changed(before), function(after)
          seen.after_first = after
          poll(nes.shown, function(second)
            seen.second = { row = second.row, inline = second.inline }
            vim.api.nvim_feedkeys(vim.keycode("<Esc>"), "n", false)  -- dismiss
            poll(function() return (nes.shown() == nil and #marks() == 0) or nil end, function()
              vim.api.nvim_win_set_cursor(0, { 3, 4 })
              nes.request()  -- ask again, on the line of the edit
              poll(nes.shown, function(third)
                seen.third = { row = third.row, inline = third.inline, marks = marks() }
                local before3 = lines()
                tab()  -- on its line: applies at once
                poll(changed(before3), function(final)
                  seen.final = final
                  vim.defer_fn(function()
                    seen.stats = stats()
                    finish(seen)
                  end, 200)
                end)
              end)
            end)
          end)
        end)
      end)
    end)
  end)
end })
"""


@pytest.mark.slow
def test_next_edits_are_drawn_jumped_to_applied_and_dismissed(nvim, tmp_path):
    with standin_in_a_thread() as remote:
        init = fill(DRIVER + SCENARIO, deadline=40_000, python=json.dumps(sys.executable),
                    url=json.dumps(remote.url), key=json.dumps(KEY))
        result = run_nvim(nvim, tmp_path, init, SOURCE, name="shapes.py")
        requests = remote.edits()
    assert "error" not in result, json.dumps(result)[-3000:]
    first = result["first"]
    assert first["row"] == 1 and first["inline"] is False  # the docstring, below the cursor
    deleted = [m for m in first["marks"] if m.get("hl") == "DiffusionLspNesDelete"]
    added = [m for m in first["marks"] if m.get("virt_lines")]
    assert deleted and deleted[0]["row"] == 1
    # the line as it will read, below it
    assert added and added[0]["virt_lines"] == '    """The area of a w by height rectangle."""'
    assert result["jumped"][0] == 2
    assert result["after_first"][1] == '    """The area of a w by height rectangle."""'
    assert result["second"]["row"] == 2
    third = result["third"]
    assert third["row"] == 2 and third["inline"] is True
    assert any(m.get("hl") == "DiffusionLspNesDelete" and m["row"] == 2 for m in third["marks"])
    assert result["final"] == SOURCE.replace("width", "w").split("\n")[:-1]
    feedback = result["stats"]["feedback"]["nextEdit"]
    assert (feedback["shown"], feedback["accepted"], feedback["rejected"]) == (3, 2, 1)
    assert len(requests) >= 3
    history = requests[0].body["messages"][0]["content"]
    assert "-def area(width, height):" in history and "+def area(w, height):" in history
