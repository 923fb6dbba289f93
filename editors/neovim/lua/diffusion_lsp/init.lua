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
local DOCTOR_TIMEOUT_MS = 60000 -- `diffusion-lsp doctor` run directly (it imports torch)

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
    require("diffusion_lsp.nes").clear_all()
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

--- The repository this plugin was loaded from (editors/neovim/lua/diffusion_lsp/init.lua).
local PLUGIN_ROOT = vim.fn.fnamemodify(debug.getinfo(1, "S").source:gsub("^@", ""), ":p:h:h:h:h:h")

--- The server command to run: `cmd` itself when its program is found, else (the default
--- `diffusion-lsp` not on PATH) the `.venv` of the repository this plugin came from; nil, and
--- why, when neither is there.
---@param cmd string[]|function
---@return string[]|function|nil, string|nil
function M.resolve_cmd(cmd)
  if type(cmd) ~= "table" or vim.fn.executable(cmd[1]) == 1 then
    return cmd
  end
  local venv = vim.fs.joinpath(PLUGIN_ROOT, ".venv", "bin", cmd[1])
  if not cmd[1]:find("/", 1, true) and vim.fn.executable(venv) == 1 then
    local found = vim.deepcopy(cmd)
    found[1] = venv
    return found
  end
  return nil, ("diffusion-lsp: `%s` not found (nor %s). Run scripts/run.sh in diffusion-lsp (or "
    .. "pip install -e /path/to/diffusion-lsp), or set cmd in require('diffusion_lsp').setup({ cmd = "
    .. "{ '/path/to/.venv/bin/diffusion-lsp', 'serve' } }). :checkhealth diffusion_lsp says more.")
    :format(cmd[1], venv)
end

--- Why the server cannot run (missing, or it quit before it started), once known: the user
--- was told once and no buffer tries again until `:DiffusionLsp restart`.
M.failure = nil

--- Say `message` once, outside whatever autocommand is running (an error there would abort
--- the buffer's own FileType and syntax autocommands).
local function fail(message)
  if M.failure then
    return
  end
  M.failure = message
  vim.schedule(function() vim.notify(message, vim.log.levels.WARN) end)
end

--- The server quit before it answered `initialize` (a broken install, a bad setting): say so
--- once, in place of Neovim's own "quit with exit code" line, which would repeat per buffer.
local function on_exit(cmd, code, signal, client_id)
  local client = vim.lsp.get_client_by_id(client_id)
  if (code == 0 and (signal == 0 or signal == 15)) or (client and client.initialized) then
    return
  end
  local builtin_line = ("Client %s quit with exit code"):format(NAME)
  local notify = vim.notify
  local function swallow_once(message, ...)
    if type(message) == "string" and vim.startswith(message, builtin_line) then
      if vim.notify == swallow_once then
        vim.notify = notify -- one line swallowed, then the user's own notify again
      end
      return
    end
    return notify(message, ...)
  end
  vim.notify = swallow_once
  vim.defer_fn(function()
    if vim.notify == swallow_once then vim.notify = notify end
  end, 1000)
  fail(("diffusion-lsp: the server (%s) quit before it started (exit code %d). :DiffusionLsp log "
    .. "shows why; :DiffusionLsp restart tries again."):format(
    type(cmd) == "table" and table.concat(cmd, " ") or "cmd", code))
end

--- Start (or reuse) the server for `bufnr` and attach it. Never raises: it runs inside the
--- buffer's FileType autocommands.
---@param bufnr integer?
---@return integer|nil client_id
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if M.failure or not wanted(bufnr) then
    return nil
  end
  local cmd, missing = M.resolve_cmd(M.config.cmd)
  if not cmd then
    fail(missing)
    return nil
  end
  local config = server_config(bufnr)
  config.cmd = cmd
  config.on_exit = function(...) on_exit(cmd, ...) end
  local ok, id = pcall(vim.lsp.start, config, { bufnr = bufnr, reuse_client = reuse_client })
  if not ok then
    fail(("diffusion-lsp: the server did not start: %s"):format(tostring(id)))
    return nil
  end
  return id
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
  M.failure = nil
  if #buffers == 0 then -- it never started (M.failure): try the loaded buffers again
    buffers = vim.tbl_filter(vim.api.nvim_buf_is_loaded, vim.api.nvim_list_bufs())
  end
  vim.defer_fn(function()
    for _, bufnr in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(bufnr) then
        M.attach(bufnr)
      end
    end
  end, 500)
end

-- Keys -----------------------------------------------------------------------------------------

--- Neovim 0.12's own renderer says nothing when it shows or drops a suggestion, so there the
--- keys are expression maps: with a suggestion shown they act, else they return the key itself,
--- typed in place (a macro or keys fed at once keep their order). On 0.10-0.11 the keys are
--- mapped in a buffer only while a suggestion is shown there (lua/diffusion_lsp/keys.lua).
local function map_builtin(lhs, action, desc)
  if not lhs then
    return
  end
  vim.keymap.set("i", lhs, function()
    if M.builtin_suggestion(0) == nil then
      return lhs
    end
    return ("<Cmd>lua require('diffusion_lsp').%s()<CR>"):format(action) -- runs in place too
  end, { desc = "diffusion-lsp: " .. desc, silent = true, expr = true })
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

local function map_builtin_keys()
  local keys = M.config.keys
  map_builtin(keys.accept, "accept", "accept the suggestion")
  map_builtin(keys.accept_word, "accept_word", "accept the next word")
  map_builtin(keys.accept_line, "accept_line", "accept the next line")
  map_builtin(keys.dismiss, "dismiss", "dismiss the suggestion")
end

-- Commands -------------------------------------------------------------------------------------

local function show_stats()
  local client = M.clients()[1]
  if not client then
    vim.notify("diffusion-lsp: the server is not running", vim.log.levels.WARN)
    return
  end
  M.call(client, "request", "diffusion/stats", vim.NIL, function(err, result)
    if err then
      vim.notify("diffusion-lsp: no stats: " .. vim.inspect(err), vim.log.levels.WARN)
      return
    end
    vim.notify(vim.inspect(result))
  end, 0)
end

--- What `diffusion-lsp doctor` says about this machine (Python, torch, GPU, models on disk,
--- the remote, PATH, the model to run here): from the running server (`diffusion/doctor`, with
--- its own state), else by running the configured server's `doctor`. Asynchronous: the editor
--- keeps working meanwhile; `on_done(text)` or `on_done(nil, err)` runs on the main loop.
---@param on_done fun(text: string|nil, err: string|nil)
function M.doctor(on_done)
  local client = M.clients()[1]
  if client then
    M.call(client, "request", "diffusion/doctor", vim.NIL, function(err, result)
      if result and type(result.text) == "string" then
        on_done(result.text)
      else
        on_done(nil, "diffusion/doctor failed: " .. vim.inspect(err))
      end
    end, 0)
    return
  end
  local cmd = M.resolve_cmd(M.config.cmd)
  if type(cmd) ~= "table" then
    on_done(nil, "the server is not running and its command is not an executable")
    return
  end
  local args = {}
  for _, arg in ipairs(cmd) do
    if arg == "serve" then break end
    args[#args + 1] = arg
  end
  args[#args + 1] = "doctor"
  local ok, err = pcall(vim.system, args, { text = true, timeout = DOCTOR_TIMEOUT_MS }, vim.schedule_wrap(function(done)
    if done.code ~= 0 then
      on_done(nil, ("%s: exit %s: %s"):format(table.concat(args, " "), tostring(done.code), done.stderr or ""))
    else
      on_done(done.stdout)
    end
  end))
  if not ok then
    on_done(nil, tostring(err))
  end
end

local function show_status()
  local line = M.status() ~= "" and M.status() or "diffusion: not running"
  M.doctor(function(text, err)
    vim.notify(line .. "\n" .. (text or ("doctor: " .. tostring(err))),
      text and vim.log.levels.INFO or vim.log.levels.WARN)
  end)
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

  if M.uses_builtin() then
    map_builtin_keys()
  end
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
