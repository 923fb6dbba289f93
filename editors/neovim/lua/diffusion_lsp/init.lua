-- diffusion-lsp for Neovim: start `diffusion-lsp serve` for the buffers you edit and show its
-- completions as ghost text.
--
-- Neovim >= 0.12 draws them with the built-in `vim.lsp.inline_completion`; 0.10 and 0.11 with
-- this plugin's own renderer (lua/diffusion_lsp/ghost.lua). All the intelligence is in the
-- server: this file only starts it, passes settings through and maps keys.

local M = {}

local NAME = "diffusion_lsp"
local SECTION = "diffusionLsp" -- the server's settings section

---@class diffusion_lsp.Keys
---@field accept string|false        accept the whole suggestion
---@field accept_word string|false   accept its next word
---@field accept_line string|false   accept the rest of its first line
---@field dismiss string|false       hide it

---@class diffusion_lsp.Options
---@field cmd string[]               the server command
---@field settings table             the server's settings tree (camelCase, see the README)
---@field filetypes string[]|nil     attach to these filetypes only (nil: every file buffer)
---@field debounce_ms integer        wait this long after a keystroke before asking (0.10-0.11)
---@field builtin boolean|"auto"     use vim.lsp.inline_completion (auto: when Neovim has it)
---@field keys diffusion_lsp.Keys    insert-mode keys; false leaves a key unmapped
---@field root_markers string[]      how the workspace root is found
---@field nes {enabled: boolean, debounce_ms: integer, keys: {jump_or_apply: string|false, dismiss: string|false}}  next edit suggestions (lua/diffusion_lsp/nes.lua)
M.defaults = {
  cmd = { "diffusion-lsp", "serve" },
  settings = {},
  filetypes = nil,
  debounce_ms = 20,
  builtin = "auto",
  keys = {
    accept = "<M-l>",
    accept_word = "<M-w>",
    accept_line = "<M-j>",
    dismiss = "<C-]>",
  },
  root_markers = { ".git", "pyproject.toml", "package.json", "go.mod", "Cargo.toml" },
  nes = {
    enabled = true,
    debounce_ms = 75,
    keys = { jump_or_apply = "<Tab>", dismiss = "<Esc>" },
  },
}

---@type diffusion_lsp.Options
M.config = vim.deepcopy(M.defaults)

--- The last `diffusion/status` notification from the server (state, message, model, device,
--- lastLatencyMs), or nil before the first.
M.last_status = nil

local has_011 = vim.fn.has("nvim-0.11") == 1

--- Call a vim.lsp.Client method: colon syntax on 0.11+, dot syntax on 0.10.
---@param client vim.lsp.Client
---@param method string
function M.call(client, method, ...)
  if has_011 then
    return client[method](client, ...)
  end
  return client[method](...)
end

--- Whether the built-in inline completion of Neovim 0.12+ draws the ghost text.
function M.uses_builtin()
  if M.config.builtin == false then
    return false
  end
  local ok, mod = pcall(require, "vim.lsp.inline_completion")
  return ok and type(mod) == "table" and mod.enable ~= nil and vim.fn.has("nvim-0.12") == 1
end

---@param bufnr integer?
---@return vim.lsp.Client[]
function M.clients(bufnr)
  return vim.lsp.get_clients({ name = NAME, bufnr = bufnr })
end

--- The suggestion shown in the current buffer (the text that accepting would insert at the
--- cursor), or nil. For statuslines and tests.
---@return string|nil
function M.suggestion()
  if M.uses_builtin() then
    return M.builtin_suggestion(vim.api.nvim_get_current_buf())
  end
  return require("diffusion_lsp.ghost").suggestion(vim.api.nvim_get_current_buf())
end

--- What the built-in renderer shows: the virtual text of its extmark.
---@param bufnr integer
---@return string|nil
function M.builtin_suggestion(bufnr)
  local ns = vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
  if not ns then
    return nil
  end
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true, limit = 1 })
  if #marks == 0 then
    return nil
  end
  local details = marks[1][4]
  local function join(chunks)
    local parts = {}
    for _, chunk in ipairs(chunks or {}) do
      parts[#parts + 1] = chunk[1]
    end
    return table.concat(parts)
  end
  local lines = { join(details.virt_text) }
  for _, chunks in ipairs(details.virt_lines or {}) do
    lines[#lines + 1] = join(chunks)
  end
  local text = table.concat(lines, "\n")
  return text ~= "" and text or nil
end

-- Status -------------------------------------------------------------------------------------

--- A short status for statuslines: "diffusion: ready 42 ms", "diffusion: loading", ...
---@return string
function M.status()
  local status = M.last_status
  if not status then
    return #M.clients() > 0 and "diffusion: starting" or ""
  end
  local text = "diffusion: " .. status.state
  if status.state == "ready" and type(status.lastLatencyMs) == "number" then
    text = text .. (" %d ms"):format(status.lastLatencyMs)
  end
  return text
end

local function on_status(_, params, ctx)
  local before = M.last_status and M.last_status.state
  M.last_status = params
  vim.cmd.redrawstatus({ bang = true })
  vim.api.nvim_exec_autocmds("User", { pattern = "DiffusionLspStatus", modeline = false, data = params })
  if params.state == "ready" and before ~= "ready" and not M.uses_builtin() then
    -- The model just finished loading: ask at once instead of waiting for the next keystroke.
    require("diffusion_lsp.ghost").on_ready(ctx.client_id)
  end
end

-- Settings -------------------------------------------------------------------------------------

--- Settings whose value is a list (an empty Lua table is sent as `[]` for these, `{}` elsewhere).
local LIST_SETTINGS = { disabledLanguages = true, stop = true }

--- `tree` as the server expects it in JSON: empty tables are objects, except list settings.
---@param tree table
function M.json_tree(tree)
  local out = {}
  for key, value in pairs(tree) do
    if type(value) == "table" and not LIST_SETTINGS[key] then
      value = M.json_tree(value)
    end
    out[key] = value
  end
  return next(out) == nil and vim.empty_dict() or out
end

--- Change server settings (a partial tree, e.g. `{ completion = { maxTokens = 32 } }`) in
--- every running server; they keep them until restarted with other settings.
---@param partial table
function M.set(partial)
  M.config.settings = vim.tbl_deep_extend("force", M.config.settings, partial)
  for _, client in ipairs(M.clients()) do
    M.call(client, "notify", "workspace/didChangeConfiguration", { settings = { [SECTION] = M.json_tree(partial) } })
  end
end

--- Whether completions are enabled (the `enable` setting).
function M.enabled()
  return M.config.settings.enable ~= false
end

---@param on boolean|nil nil toggles
function M.enable(on)
  if on == nil then
    on = not M.enabled()
  end
  M.set({ enable = on })
  if not on then
    require("diffusion_lsp.ghost").clear_all()
  end
  vim.notify(("diffusion-lsp: completions %s"):format(on and "enabled" or "disabled"))
end

-- Starting the server --------------------------------------------------------------------------

local function server_config(bufnr)
  local root = vim.fs.root and vim.fs.root(bufnr, M.config.root_markers) or nil
  return {
    name = NAME,
    cmd = M.config.cmd,
    root_dir = root or vim.fn.getcwd(),
    init_options = M.json_tree(M.config.settings),
    handlers = {
      ["diffusion/status"] = on_status,
      ["diffusion/preview"] = function(...) return require("diffusion_lsp.preview").on_preview(...) end,
    },
  }
end

--- One server per Neovim, whatever the root: the model is loaded once.
local function reuse_client(client, config)
  return client.name == config.name
end

---@param bufnr integer
local function wanted(bufnr)
  if vim.bo[bufnr].buftype ~= "" or vim.bo[bufnr].filetype == "" then
    return false
  end
  local filetypes = M.config.filetypes
  return filetypes == nil or vim.tbl_contains(filetypes, vim.bo[bufnr].filetype)
end

--- Start (or reuse) the server for `bufnr` and attach it.
---@param bufnr integer?
---@return integer|nil client_id
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if not wanted(bufnr) then
    return nil
  end
  local cmd = M.config.cmd
  if type(cmd) == "table" and vim.fn.executable(cmd[1]) ~= 1 then
    if not M._warned_missing then
      M._warned_missing = true
      vim.notify(
        ("diffusion-lsp: `%s` not found. Install it (pip install -e /path/to/diffusion-lsp) or set "
          .. "cmd in require('diffusion_lsp').setup({ cmd = { '/path/to/.venv/bin/diffusion-lsp', 'serve' } })")
          :format(cmd[1]),
        vim.log.levels.ERROR
      )
    end
    return nil
  end
  return vim.lsp.start(server_config(bufnr), { bufnr = bufnr, reuse_client = reuse_client })
end

local function on_lsp_attach(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if not client or client.name ~= NAME then
    return
  end
  if M.uses_builtin() then
    vim.lsp.inline_completion.enable(true, { bufnr = args.buf, client_id = client.id })
  else
    require("diffusion_lsp.ghost").attach(args.buf, client.id)
  end
  if M.config.nes.enabled then
    require("diffusion_lsp.nes").attach(args.buf)
  end
end

local function on_lsp_detach(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if client and client.name == NAME and not M.uses_builtin() then
    require("diffusion_lsp.ghost").detach(args.buf)
  end
  if client and client.name == NAME then
    require("diffusion_lsp.nes").detach(args.buf)
  end
end

--- Restart the server (e.g. after changing the model), keeping its buffers.
function M.restart()
  local buffers = {}
  for _, client in ipairs(M.clients()) do
    for bufnr in pairs(client.attached_buffers) do
      buffers[#buffers + 1] = bufnr
    end
    M.call(client, "stop")
  end
  M.last_status = nil
  vim.defer_fn(function()
    for _, bufnr in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(bufnr) then
        M.attach(bufnr)
      end
    end
  end, 500)
end

-- Keys -----------------------------------------------------------------------------------------

--- Run `action`; when it did nothing (no suggestion shown), type the key as if unmapped.
local function map(lhs, action, desc)
  if not lhs then
    return
  end
  vim.keymap.set("i", lhs, function()
    if not action() then
      vim.api.nvim_feedkeys(vim.keycode(lhs), "n", false)
    end
  end, { desc = "diffusion-lsp: " .. desc, silent = true })
end

local function builtin_partial(pattern)
  return function()
    local ghost = require("diffusion_lsp.ghost")
    return vim.lsp.inline_completion.get({
      on_accept = function(item)
        local text = type(item.insert_text) == "table" and item.insert_text.value
          or item.insert_text
          or item.insertText
        ghost.insert_at_cursor(ghost.partial(text or "", pattern))
      end,
    })
  end
end

--- Accept the whole suggestion; false when none is shown.
function M.accept()
  if M.uses_builtin() then
    return vim.lsp.inline_completion.get() == true
  end
  return require("diffusion_lsp.ghost").accept("all")
end

function M.accept_word()
  if M.uses_builtin() then
    return builtin_partial("word")() == true
  end
  return require("diffusion_lsp.ghost").accept("word")
end

function M.accept_line()
  if M.uses_builtin() then
    return builtin_partial("line")() == true
  end
  return require("diffusion_lsp.ghost").accept("line")
end

function M.dismiss()
  if M.uses_builtin() then
    local ns = vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
    local shown = M.builtin_suggestion(0) ~= nil
    if ns then
      vim.api.nvim_buf_clear_namespace(0, ns, 0, -1)
    end
    return shown
  end
  return require("diffusion_lsp.ghost").dismiss()
end

local function map_keys()
  local keys = M.config.keys
  map(keys.accept, M.accept, "accept the suggestion")
  map(keys.accept_word, M.accept_word, "accept the next word")
  map(keys.accept_line, M.accept_line, "accept the next line")
  map(keys.dismiss, M.dismiss, "dismiss the suggestion")
end

-- Commands -------------------------------------------------------------------------------------

local function show_stats()
  local client = M.clients()[1]
  if not client then
    vim.notify("diffusion-lsp: the server is not running", vim.log.levels.WARN)
    return
  end
  local reply = M.call(client, "request_sync", "diffusion/stats", vim.NIL, 3000, 0)
  if not reply or reply.err then
    vim.notify("diffusion-lsp: no stats: " .. vim.inspect(reply and reply.err), vim.log.levels.WARN)
    return
  end
  vim.notify(vim.inspect(reply.result))
end

--- What `diffusion-lsp doctor` says about this machine (Python, torch, GPU, models on disk,
--- the remote, PATH, the model to run here): from the running server (`diffusion/doctor`, with
--- its own state), else by running the configured server's `doctor`.
---@return string|nil text, string|nil err
function M.doctor()
  local client = M.clients()[1]
  if client then
    local reply = M.call(client, "request_sync", "diffusion/doctor", vim.NIL, 60000, 0)
    if reply and reply.result and type(reply.result.text) == "string" then
      return reply.result.text
    end
    return nil, "diffusion/doctor failed: " .. vim.inspect(reply and reply.err or "timeout")
  end
  local cmd = M.config.cmd
  if type(cmd) ~= "table" or vim.fn.exepath(cmd[1]) == "" then
    return nil, "the server is not running and its command is not an executable"
  end
  local args = {}
  for _, arg in ipairs(cmd) do
    if arg == "serve" then break end
    args[#args + 1] = arg
  end
  args[#args + 1] = "doctor"
  local done = vim.system(args, { text = true }):wait(60000)
  if done.code ~= 0 then
    return nil, ("%s: exit %s: %s"):format(table.concat(args, " "), tostring(done.code),
      done.stderr or "")
  end
  return done.stdout
end

local function show_status()
  local line = M.status() ~= "" and M.status() or "diffusion: not running"
  local text, err = M.doctor()
  vim.notify(line .. "\n" .. (text or ("doctor: " .. tostring(err))),
    text and vim.log.levels.INFO or vim.log.levels.WARN)
end

local commands = {
  enable = function() M.enable(true) end,
  disable = function() M.enable(false) end,
  toggle = function() M.enable(nil) end,
  restart = M.restart,
  status = show_status,
  stats = show_stats,
  log = function() vim.cmd.edit(vim.lsp.get_log_path()) end,
}

local function command(opts)
  local run = commands[opts.fargs[1] or "status"]
  if not run then
    vim.notify("diffusion-lsp: unknown subcommand; one of: "
      .. table.concat(vim.tbl_keys(commands), ", "), vim.log.levels.ERROR)
    return
  end
  run()
end

-- Setup ----------------------------------------------------------------------------------------

---@param opts diffusion_lsp.Options|nil
function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  for _, list in ipairs({ "cmd", "filetypes", "root_markers" }) do
    if opts and opts[list] then
      M.config[list] = opts[list] -- a list replaces the default, never merges into it by index
    end
  end
  vim.api.nvim_set_hl(0, "DiffusionLspSuggestion", { link = "Comment", default = true })
  if M.config.settings.completion == nil or M.config.settings.completion.preview == nil then
    -- watch the hole denoise (the server's default is off; an editor client turns it on)
    M.config.settings.completion = vim.tbl_extend("force", M.config.settings.completion or {}, { preview = true })
  end

  local group = vim.api.nvim_create_augroup("diffusion_lsp", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    callback = function(args) M.attach(args.buf) end,
  })
  vim.api.nvim_create_autocmd("LspAttach", { group = group, callback = on_lsp_attach })
  vim.api.nvim_create_autocmd("LspDetach", { group = group, callback = on_lsp_detach })
  require("diffusion_lsp.ghost").setup(group)
  require("diffusion_lsp.preview").setup(group)
  if M.config.nes.enabled then
    require("diffusion_lsp.nes").setup(group)
  end

  map_keys()
  vim.api.nvim_create_user_command("DiffusionLsp", command, {
    nargs = "?",
    complete = function() return vim.tbl_keys(commands) end,
    desc = "diffusion-lsp: enable | disable | toggle | restart | status | stats | log",
  })

  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      M.attach(bufnr)
    end
  end
end

return M
