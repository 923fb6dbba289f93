"""The Neovim plugin takes nothing of the user's and leaves nothing stale (issue 29), in a real
headless Neovim with a fake server inside it (no model):

* a missing or failing server costs one message, once, and no error in the buffer's own
  autocommands (FileType and syntax intact); the `.venv` of the plugin's repository is found;
* no global key map: keys replayed from a macro or fed at once type what they say, a next
  edit's <Tab> is mapped in its buffer only while it is shown, and the user's own <Tab> mapping
  works whenever nothing is shown;
* a live preview goes when its request ends without one (an answer from the type-along cache,
  the dismiss key, `:DiffusionLsp disable`), and `:DiffusionLsp status` never blocks the editor.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

from tests.neovim_helpers import DRIVER, FAKE_LSP, PLUGIN, fill, run_nvim

PYTHON_FILE = "if ready:\n    value = 1\n"


def copy_plugin(root: Path) -> Path:
    """The plugin in a repository of its own at `root` (editors/neovim), without a .venv."""
    plugin = root / "editors" / "neovim"
    shutil.copytree(PLUGIN, plugin)
    return plugin


def executable(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# Open a second Python file, then report what the user saw: messages, errors, the buffer's
# filetype and syntax, and what the plugin resolved its command to.
MISSING = """
local notified = {}
vim.notify = function(message, level) notified[#notified + 1] = message end
local plugin = require("diffusion_lsp")
plugin.setup({})  -- the README's default: cmd = { "diffusion-lsp", "serve" }
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  vim.defer_fn(function()
    local first = { filetype = vim.bo.filetype, syntax = vim.b.current_syntax }
    vim.cmd("edit second.py")
    vim.defer_fn(function()
      finish({ notified = notified, errmsg = vim.v.errmsg, first = first,
               second = { filetype = vim.bo.filetype, syntax = vim.b.current_syntax },
               messages = vim.api.nvim_exec2("messages", { output = true }).output,
               cmd = plugin.resolve_cmd(plugin.config.cmd), clients = #plugin.clients() })
    end, 1500)
  end, 1500)
end })
"""


def check_quiet(result: dict, expected_message: str) -> None:
    assert "error" not in result, result
    assert result["errmsg"] == "", result["errmsg"]
    assert "Error" not in result["messages"], result["messages"]
    for buffer in ("first", "second"):  # its FileType and syntax autocommands all ran
        assert result[buffer] == {"filetype": "python", "syntax": "python"}, result
    assert len(result["notified"]) == 1, result["notified"]  # one message for two buffers
    assert expected_message in result["notified"][0], result["notified"]


def test_a_missing_server_costs_one_message_and_nothing_else(nvim, tmp_path):
    plugin = copy_plugin(tmp_path / "repo")
    (tmp_path / "second.py").write_text(PYTHON_FILE)
    result = run_nvim(nvim, tmp_path, fill(DRIVER + MISSING, deadline=20_000), PYTHON_FILE,
                      plugin=plugin, path="/usr/bin:/bin")
    check_quiet(result, "`diffusion-lsp` not found")
    assert result.get("cmd") is None and result["clients"] == 0


def test_the_venv_of_the_plugins_repository_is_found_and_a_failing_server_said_once(
        nvim, tmp_path):
    """Not on PATH, the server is taken from the .venv next to the plugin; one that quits at
    once (a broken install) is one message, not Neovim's line per buffer."""
    plugin = copy_plugin(tmp_path / "repo")
    server = executable(tmp_path / "repo" / ".venv" / "bin" / "diffusion-lsp",
                        'echo "broken install" >&2\nexit 3\n')
    (tmp_path / "second.py").write_text(PYTHON_FILE)
    result = run_nvim(nvim, tmp_path, fill(DRIVER + MISSING, deadline=20_000), PYTHON_FILE,
                      plugin=plugin, path="/usr/bin:/bin")
    assert result["cmd"] == [str(server), "serve"]
    check_quiet(result, "quit before it started (exit code 3)")


# A fake server inside Neovim (FAKE_LSP). Completions: while
# `vim.g.hold` is set it sends live previews of the hole and does not answer (denoising), else
# it answers at once without previews (a type-along cache hit). Next edits: while
# `vim.g.offer_edit` is set, one edit on the first line.
FAKE = FAKE_LSP + """
local fake_server = fake_lsp({ inlineCompletionProvider = true, textDocumentSync = 1 },
  function(method, params, callback, dispatchers)
    if method == "textDocument/inlineCompletion" then
      if vim.g.hold then
        local bufnr = vim.uri_to_bufnr(params.textDocument.uri)
        local function preview(step)
          dispatchers.notification("diffusion/preview", {
            textDocument = { uri = params.textDocument.uri,
                             version = vim.lsp.util.buf_versions[bufnr] },
            position = params.position, step = step, steps = 4, done = false,
            text = ("ab"):sub(1, step) .. ("\\226\\150\\145"):rep(4 - step) })
        end
        vim.defer_fn(function() preview(1) end, 10)
        vim.defer_fn(function() preview(2) end, 300)  -- after a dismissal: must stay away
      else
        vim.schedule(function() callback(nil, { items = { { insertText = "cached" } } }) end)
      end
    elseif method == "textDocument/copilotInlineEdit" then
      local edits = {}
      if vim.g.offer_edit then
        edits = { { text = "if done:", textDocument = params.textDocument,
                    range = { start = { line = 0, character = 0 },
                              ["end"] = { line = 0, character = 9 } } } }
      end
      vim.schedule(function() callback(nil, { edits = edits }) end)
    else
      vim.schedule(function() callback(nil, nil) end)
    end
  end)
local plugin = require("diffusion_lsp")
local preview_ns = require("diffusion_lsp.preview").ns
local function previews() return #vim.api.nvim_buf_get_extmarks(0, preview_ns, 0, -1, {}) end
local function ours(maps)
  local out = {}
  for _, m in ipairs(maps) do
    if (m.desc or ""):find("diffusion%-lsp") then out[#out + 1] = m.mode .. " " .. m.lhs end
  end
  return out
end
local function plugin_maps()  -- the plugin's maps, global and in this buffer
  local out = {}
  for _, mode in ipairs({ "n", "i" }) do
    vim.list_extend(out, ours(vim.api.nvim_get_keymap(mode)))
    vim.list_extend(out, ours(vim.api.nvim_buf_get_keymap(0, mode)))
  end
  return out
end
"""

# Keys replayed from a register and fed all at once, in an indented block: the same lines as in
# a Neovim without the plugin.
REPLAY = """
@setup@
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  poll(function() return (@plugin@ == false or #plugin.clients() > 0) or nil end, function()
    seen.maps = @plugin@ and plugin_maps() or {}
    vim.api.nvim_win_set_cursor(0, { 2, 0 })
    vim.fn.setreg("q", vim.keycode("o<Tab>pass<Esc>"))
    vim.api.nvim_feedkeys("@q", "tx", false)  -- a macro
    vim.api.nvim_win_set_cursor(0, { 1, 0 })
    vim.api.nvim_feedkeys(vim.keycode("O<Tab>x<Esc>"), "tx", false)  -- keys fed at once
    seen.lines = lines()
    finish(seen)
  end)
end })
"""


def test_macros_and_keys_fed_at_once_type_what_they_say(nvim, tmp_path):
    results = {}
    for with_plugin in (False, True):
        setup = "plugin.setup({ cmd = fake_server, debounce_ms = 1 })" if with_plugin else ""
        init = fill(DRIVER + FAKE + REPLAY, setup=setup, plugin=str(with_plugin).lower(),
                    deadline=15_000)
        results[with_plugin] = run_nvim(nvim, tmp_path, init, PYTHON_FILE, name="block.py")
        assert "error" not in results[with_plugin], results[with_plugin]
    plain, with_plugin = results[False]["lines"], results[True]["lines"]
    assert plain[3] == "        pass"  # `o` indents to the block, <Tab> one level more
    assert with_plugin == plain
    assert results[True]["maps"] == []  # no key of the plugin's, global or in the buffer


NEXT_EDIT_TAB = """
plugin.setup({ cmd = fake_server, debounce_ms = 1, nes = { debounce_ms = 1 } })
local nes = require("diffusion_lsp.nes")
-- the user's own <Tab> in insert mode (a completion plugin's), set before
vim.keymap.set("i", "<Tab>", function() vim.g.user_tab = (vim.g.user_tab or 0) + 1 end,
  { desc = "the user's tab" })
local function user_tab()  -- the global insert-mode <Tab> map's description
  for _, m in ipairs(vim.api.nvim_get_keymap("i")) do
    if m.lhs == "<Tab>" then return m.desc end
  end
end
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  poll(function() return #plugin.clients() > 0 or nil end, function()
    vim.api.nvim_win_set_cursor(0, { 2, 0 })
    vim.api.nvim_feedkeys(vim.keycode("A<Tab><Esc>"), "tx", false)
    seen.before = { user_tab = vim.g.user_tab, maps = plugin_maps(), line = lines()[2] }
    vim.g.offer_edit = true
    nes.request()
    poll(nes.shown, function(shown)
      seen.shown = { row = shown.row, maps = plugin_maps(), global_tab = user_tab(),
                     held = require("diffusion_lsp.keys").held() }
      vim.g.offer_edit = false
      vim.api.nvim_feedkeys(vim.keycode("<Tab>"), "tx", false)  -- jump (normal mode)
      seen.jumped = vim.api.nvim_win_get_cursor(0)
      vim.api.nvim_feedkeys(vim.keycode("<Tab>"), "tx", false)  -- apply
      seen.applied = lines()
      vim.api.nvim_win_set_cursor(0, { 2, 0 })
      vim.api.nvim_feedkeys(vim.keycode("A<Tab><Esc>"), "tx", false)
      seen.after = { user_tab = vim.g.user_tab, maps = plugin_maps(), global_tab = user_tab() }
      finish(seen)
    end)
  end)
end })
"""


def test_next_edit_tab_is_mapped_only_while_shown_and_the_users_tab_is_kept(nvim, tmp_path):
    init = fill(DRIVER + FAKE + NEXT_EDIT_TAB, deadline=15_000)
    result = run_nvim(nvim, tmp_path, init, PYTHON_FILE, name="block.py")
    assert "error" not in result, result
    before = result["before"]
    # nothing shown: <Tab> is the user's, and the plugin maps nothing
    assert before["user_tab"] == 1 and before["maps"] == [] and before["line"] == "    value = 1"
    shown = result["shown"]
    assert shown["row"] == 0
    assert sorted(shown["maps"]) == ["i <Tab>", "n <Tab>"]  # in this buffer, while shown
    assert shown["global_tab"] == "the user's tab"
    assert result["jumped"] == [1, 0]
    assert result["applied"][0] == "if done:"
    after = result["after"]
    assert after["user_tab"] == 2 and after["maps"] == []
    assert after["global_tab"] == "the user's tab"


# A preview is drawn while the hole denoises; then its request ends without a `done` preview.
STICKY = """
plugin.setup({ cmd = fake_server, debounce_ms = 1, nes = { enabled = false } })
local function denoising(keys, after)
  vim.g.hold = true
  vim.api.nvim_feedkeys(keys, "t", false)
  poll(function() return previews() > 0 or nil end, after)
end
--- `previews()` now and 450 ms later (a late preview of the ended request must not redraw).
local function settled(name, after)
  poll(function() return previews() == 0 or nil end, function()
    vim.defer_fn(function()
      seen[name] = previews()
      after()
    end, 450)
  end)
end
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  poll(function() return #plugin.clients() > 0 or nil end, function()
    vim.api.nvim_win_set_cursor(0, { 2, 0 })
    denoising("A", function()
      seen.dismiss_key_while_denoising = require("diffusion_lsp.keys").held()
      -- a typo and Backspace: the new request is answered from the cache, with no preview
      vim.g.hold = false
      vim.api.nvim_feedkeys("x" .. vim.keycode("<BS>"), "t", false)
      poll(plugin.suggestion, function(shown)
        seen.cached = shown
        settled("after_cache_answer", function()
          denoising("y", function()
            vim.api.nvim_feedkeys(vim.keycode("<C-]>"), "t", false)  -- dismiss
            settled("after_dismiss", function()
              seen.line_after_dismiss = lines()[2]
              denoising("z", function()
                vim.cmd("DiffusionLsp disable")
                settled("after_disable", function() finish(seen) end)
              end)
            end)
          end)
        end)
      end)
    end)
  end)
end })
"""


def test_a_preview_goes_when_its_request_ends_without_one(nvim, tmp_path):
    init = fill(DRIVER + FAKE + STICKY, deadline=15_000)
    result = run_nvim(nvim, tmp_path, init, PYTHON_FILE, name="block.py")
    assert "error" not in result, result
    assert result["dismiss_key_while_denoising"] == ["i <C-]>"]
    assert result["cached"] == "cached"
    assert result["after_cache_answer"] == 0
    assert result["after_dismiss"] == 0
    assert result["line_after_dismiss"] == "    value = 1y"  # the key dismissed, typed nothing
    assert result["after_disable"] == 0


STATUS = """
local plugin = require("diffusion_lsp")
plugin.setup({ cmd = { @doctor@, "serve" }, filetypes = { "python" } })
vim.api.nvim_create_autocmd("VimEnter", { callback = function()
  local notified = {}
  vim.notify = function(message) notified[#notified + 1] = message end
  local began = vim.uv.hrtime()
  vim.cmd("DiffusionLsp status")
  seen.command_ms = (vim.uv.hrtime() - began) / 1e6
  local ticks = 0
  local timer = vim.uv.new_timer()
  timer:start(50, 50, vim.schedule_wrap(function() ticks = ticks + 1 end))
  poll(function() return notified[1] end, function(shown)
    timer:stop()
    finish({ command_ms = seen.command_ms, shown = shown, ticks = ticks })
  end)
end })
"""


def test_status_without_a_server_keeps_the_editor_responsive(nvim, tmp_path):
    doctor = executable(tmp_path / "bin" / "slow-doctor", 'sleep 1.5\necho "report: $1"\n')
    init = fill(DRIVER + STATUS, deadline=15_000, doctor=json.dumps(str(doctor)))
    result = run_nvim(nvim, tmp_path, init, "text\n", name="notes.txt")
    assert "error" not in result, result
    assert result["command_ms"] < 500, result  # the doctor runs in the background
    assert result["ticks"] >= 10  # the editor's loop ran meanwhile
    assert result["shown"] == "diffusion: not running\nreport: doctor\n", result
