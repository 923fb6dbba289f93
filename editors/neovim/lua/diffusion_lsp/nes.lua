-- Next edit suggestions: `textDocument/copilotInlineEdit` (the server predicts the edit the user
-- makes next, anywhere in the editable region around the cursor).
--
-- After each change (debounced) the plugin asks the server and draws the first edit:
--   * on the cursor's line, as ghost text: the text it deletes highlighted
--     (DiffusionLspNesDelete), the new text inline after it (DiffusionLspNesAdd);
--   * away from the cursor: the text it deletes highlighted, the new lines as virtual lines
--     below, and a "Tab" hint at the end of the line.
-- <Tab> (normal and insert mode, mapped in the buffer only while an edit is shown) jumps to an
-- edit away from the cursor, and applies it when the cursor is there; <Esc> dismisses it. The server hears of each: didShowInlineEdit when drawn,
-- the edit's command (workspace/executeCommand) when applied, diffusion/didDismiss when
-- dismissed. Any change to the buffer drops a drawn edit (its version is stale).

local api = vim.api
local M = {}

local ns = api.nvim_create_namespace("diffusion_lsp.nes")
local METHOD = "textDocument/copilotInlineEdit"

---@class diffusion_lsp.NextEdit
---@field edit table          the server's edit: {range, text, textDocument, command}
---@field row integer         0-based start row
---@field col integer         byte start column
---@field end_row integer
---@field end_col integer
---@field inline boolean      drawn as ghost text on the cursor's line
---@field client_id integer

---@type table<integer, {timer: uv_timer_t|nil, request: {client_id: integer, id: integer}|nil, shown: diffusion_lsp.NextEdit|nil, seq: integer}>
local buffers = {}

local function core()
  return require("diffusion_lsp")
end

local function state(bufnr)
  buffers[bufnr] = buffers[bufnr] or { seq = 0 }
  return buffers[bufnr]
end

local byte_col = require("diffusion_lsp.ghost").byte_col  -- LSP character -> byte column

local keys = require("diffusion_lsp.keys")

local function clear(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
  keys.unbind(bufnr, "nes")
  local s = buffers[bufnr]
  if s then
    s.shown = nil
  end
end

local function cancel(bufnr)
  local s = buffers[bufnr]
  if s and s.request then
    local client = vim.lsp.get_client_by_id(s.request.client_id)
    if client then
      core().call(client, "cancel_request", s.request.id)
    end
    s.request = nil
  end
end

--- The edit drawn in `bufnr`, or nil. For statuslines and tests.
---@return diffusion_lsp.NextEdit|nil
function M.shown(bufnr)
  local s = buffers[bufnr == nil and api.nvim_get_current_buf() or bufnr]
  return s and s.shown or nil
end

---@param bufnr integer
---@param client vim.lsp.Client
---@param edit table
local function draw(bufnr, client, edit)
  local lines = api.nvim_buf_get_lines(bufnr, 0, -1, false)
  local range = edit.range
  local encoding = client.offset_encoding or "utf-16"
  local row, end_row = range.start.line, range["end"].line
  if row >= #lines + 1 then
    return nil
  end
  local col = byte_col(lines[row + 1] or "", range.start.character, encoding)
  local end_col = byte_col(lines[end_row + 1] or "", range["end"].character, encoding)
  local cursor_row = api.nvim_win_get_cursor(0)[1] - 1
  local new_lines = vim.split(edit.text or "", "\n", { plain = true })
  local inline = row == cursor_row and end_row == row and #new_lines == 1
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  if end_row > row or end_col > col then -- the text it deletes
    api.nvim_buf_set_extmark(bufnr, ns, row, col, {
      end_row = end_row, end_col = end_col, hl_group = "DiffusionLspNesDelete",
    })
  end
  if inline then
    if edit.text ~= "" then
      api.nvim_buf_set_extmark(bufnr, ns, end_row, end_col, {
        virt_text = { { edit.text, "DiffusionLspNesAdd" } }, virt_text_pos = "inline",
      })
    end
  else
    -- the lines as they will read: before the range, the new text, after the range
    local result = vim.deepcopy(new_lines)
    result[1] = (lines[row + 1] or ""):sub(1, col) .. result[1]
    result[#result] = result[#result] .. (lines[end_row + 1] or ""):sub(end_col + 1)
    local virt_lines = {}
    for _, line in ipairs(result) do
      virt_lines[#virt_lines + 1] = { { line, "DiffusionLspNesAdd" } }
    end
    api.nvim_buf_set_extmark(bufnr, ns, end_row, 0, {
      virt_lines = virt_lines,
      virt_text = { { (" ⇥ %s: next edit"):format(core().config.nes.keys.jump_or_apply or "Tab"),
        "DiffusionLspNesHint" } }, virt_text_pos = "eol",
    })
  end
  return { edit = edit, row = row, col = col, end_row = end_row, end_col = end_col,
           inline = inline, client_id = client.id }
end

--- Ask the server for the next edit at the cursor of the current window's buffer.
---@param bufnr integer|nil
function M.request(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local client = core().clients(bufnr)[1]
  if not client or not core().enabled() then
    return
  end
  local s = state(bufnr)
  cancel(bufnr)
  s.seq = s.seq + 1
  local seq = s.seq
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding or "utf-16")
  params.textDocument.version = vim.lsp.util.buf_versions[bufnr]
  local ok, id = core().call(client, "request", METHOD, params, function(err, result)
    if seq ~= s.seq then
      return
    end
    s.request = nil
    if err or not result or not result.edits or #result.edits == 0 then
      return
    end
    local edit = result.edits[1]
    if edit.textDocument and edit.textDocument.version ~= vim.lsp.util.buf_versions[bufnr] then
      return -- the buffer changed meanwhile
    end
    if api.nvim_get_current_buf() ~= bufnr then
      return
    end
    s.shown = draw(bufnr, client, edit)
    if s.shown then
      -- <Tab> is ours only while the edit is shown, and only in this buffer
      keys.bind(bufnr, "nes", { "n", "i" }, core().config.nes.keys.jump_or_apply, M.jump_or_apply,
        "jump to / apply the next edit")
      core().call(client, "notify", "textDocument/didShowInlineEdit", { item = { command = edit.command } })
    end
  end, bufnr)
  if ok then
    s.request = { client_id = client.id, id = id }
  end
end

local function schedule(bufnr)
  local s = state(bufnr)
  if s.shown then
    clear(bufnr) -- stale now: the buffer changed
  end
  if s.timer then
    s.timer:stop()
  else
    s.timer = vim.uv.new_timer()
  end
  s.timer:start(core().config.nes.debounce_ms, 0, vim.schedule_wrap(function()
    if api.nvim_buf_is_valid(bufnr) and api.nvim_get_current_buf() == bufnr then
      M.request(bufnr)
    end
  end))
end

--- Tab: jump to a shown edit away from the cursor, or apply it when the cursor is there.
---@return boolean  whether there was an edit to act on
function M.jump_or_apply()
  local bufnr = api.nvim_get_current_buf()
  local shown = M.shown(bufnr)
  if not shown then
    return false
  end
  local cursor = api.nvim_win_get_cursor(0)
  if not shown.inline and (cursor[1] - 1 ~= shown.row) then
    api.nvim_win_set_cursor(0, { shown.row + 1, shown.col })
    return true
  end
  M.apply(bufnr)
  return true
end

--- Apply the shown edit and tell the server (the edit's command).
function M.apply(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local shown = M.shown(bufnr)
  if not shown then
    return false
  end
  local client = vim.lsp.get_client_by_id(shown.client_id)
  clear(bufnr)
  if not client then
    return false
  end
  local edit = shown.edit
  vim.lsp.util.apply_text_edits({ { range = edit.range, newText = edit.text } }, bufnr,
    client.offset_encoding or "utf-16")
  local lines = vim.split(edit.text, "\n", { plain = true })
  local row = shown.row + #lines - 1
  local col = #lines == 1 and shown.col + #lines[1] or #lines[#lines]
  pcall(api.nvim_win_set_cursor, 0, { row + 1, col })
  if edit.command then
    core().call(client, "request", "workspace/executeCommand",
      { command = edit.command.command, arguments = edit.command.arguments }, function() end, bufnr)
  end
  return true
end

--- Esc: drop the shown edit (the server counts it as rejected).
function M.dismiss(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local shown = M.shown(bufnr)
  cancel(bufnr)
  if not shown then
    return false
  end
  clear(bufnr)
  local client = vim.lsp.get_client_by_id(shown.client_id)
  if client then
    core().call(client, "notify", "diffusion/didDismiss", { item = { command = shown.edit.command } })
  end
  return true
end

--- Drop every edit shown and every request (completions were disabled).
function M.clear_all()
  for bufnr in pairs(buffers) do
    cancel(bufnr)
    clear(bufnr)
  end
end

function M.attach(bufnr)
  state(bufnr)
end

function M.detach(bufnr)
  cancel(bufnr)
  clear(bufnr)
  local s = buffers[bufnr]
  if s and s.timer then
    s.timer:stop()
    s.timer:close()
  end
  buffers[bufnr] = nil
end

---@param group integer
function M.setup(group)
  vim.api.nvim_set_hl(0, "DiffusionLspNesDelete", { link = "DiffDelete", default = true })
  vim.api.nvim_set_hl(0, "DiffusionLspNesAdd", { link = "DiffAdd", default = true })
  vim.api.nvim_set_hl(0, "DiffusionLspNesHint", { link = "Comment", default = true })
  api.nvim_create_autocmd({ "TextChanged", "TextChangedI" }, {
    group = group,
    callback = function(args)
      if buffers[args.buf] then
        schedule(args.buf)
      end
    end,
  })
  api.nvim_create_autocmd({ "BufLeave" }, {
    group = group,
    callback = function(args)
      if buffers[args.buf] then
        M.dismiss(args.buf)
      end
    end,
  })
  local dismiss = core().config.nes.keys.dismiss
  if dismiss then
    -- Esc keeps its meaning (it is not mapped); it also drops a shown edit
    local dismiss_key = vim.keycode(dismiss)
    vim.on_key(function(key, typed)
      if key == dismiss_key or typed == dismiss_key then
        local bufnr = api.nvim_get_current_buf()
        if M.shown(bufnr) then
          vim.schedule(function() M.dismiss(bufnr) end)
        end
      end
    end, ns)
  end
end

return M
