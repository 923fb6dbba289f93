-- Ghost text for Neovim 0.10 and 0.11, which have no built-in inline completion.
--
-- In insert mode, each change waits `debounce_ms`, then asks the server for
-- `textDocument/inlineCompletion` at the cursor (cancelling the request before it) and draws the
-- first item: its first line as inline virtual text at the cursor, the other lines as virtual
-- lines below. Typing what the suggestion says keeps the rest shown; any other change or cursor
-- move drops it and asks again; leaving insert mode drops it. Accepting applies the item's range
-- (which may replace text after the cursor that the completion already contains).

local api = vim.api
local M = {}

local ns = api.nvim_create_namespace("diffusion_lsp.ghost")
local TRIGGER_AUTOMATIC = 2 -- lsp.InlineCompletionTriggerKind.Automatic

---@class diffusion_lsp.Suggestion
---@field row integer       0-based row of the cursor it was made for
---@field col integer       byte column of that cursor
---@field end_row integer   the range it replaces ends here (0-based row, byte column)
---@field end_col integer
---@field text string       what accepting inserts
---@field tick integer      b:changedtick when it was drawn for this cursor
---@field item table        the server's item, as received

---@class diffusion_lsp.BufState
---@field client_id integer
---@field timer uv_timer_t|nil
---@field request {client_id: integer, id: integer}|nil
---@field seq integer
---@field suggestion diffusion_lsp.Suggestion|nil

---@type table<integer, diffusion_lsp.BufState>
local buffers = {}

local function core()
  return require("diffusion_lsp")
end

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == "i"
end

-- Positions ------------------------------------------------------------------------------------

--- Byte column of LSP position `character` in `line`, in the client's position encoding
--- (next edits use it too).
---@param line string
---@param character integer
---@param encoding string
function M.byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  local ok, col
  if vim.fn.has("nvim-0.11") == 1 then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  end
  return ok and col or #line
end

---@param bufnr integer
---@param position {line: integer, character: integer}
---@param encoding string
local function to_byte_position(bufnr, position, encoding)
  local line = api.nvim_buf_get_lines(bufnr, position.line, position.line + 1, false)[1] or ""
  return position.line, M.byte_col(line, position.character, encoding)
end

-- Drawing --------------------------------------------------------------------------------------

--- Text as virtual text shows it: tabs expanded (virtual text has no tab stops).
local function visible(text)
  return (text:gsub("\t", string.rep(" ", vim.bo.tabstop)))
end

local keys = require("diffusion_lsp.keys")

---@param bufnr integer
local function undraw(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
  keys.unbind(bufnr, "ghost")
end

--- The keys of `setup({ keys = ... })`, mapped in `bufnr` while a suggestion is shown there.
local function bind_keys(bufnr)
  local config = core().config.keys
  keys.bind(bufnr, "ghost", { "i" }, config.accept, function() return M.accept("all") end,
    "accept the suggestion")
  keys.bind(bufnr, "ghost", { "i" }, config.accept_word, function() return M.accept("word") end,
    "accept the next word")
  keys.bind(bufnr, "ghost", { "i" }, config.accept_line, function() return M.accept("line") end,
    "accept the next line")
  keys.bind(bufnr, "ghost", { "i" }, config.dismiss, M.dismiss, "dismiss the suggestion")
end

---@param bufnr integer
---@param s diffusion_lsp.Suggestion
local function draw(bufnr, s)
  api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  local hl = "DiffusionLspSuggestion"
  local lines = vim.split(s.text, "\n", { plain = true })
  local first = lines[1]
  if s.end_row == s.row and s.end_col > s.col then
    -- The completion replaces text after the cursor that it contains (e.g. closing brackets):
    -- when that text ends its first line, show only the part before it.
    local line = api.nvim_buf_get_lines(bufnr, s.row, s.row + 1, false)[1] or ""
    local replaced = line:sub(s.col + 1, s.end_col)
    if #lines == 1 and replaced ~= "" and first:sub(-#replaced) == replaced then
      first = first:sub(1, #first - #replaced)
    end
  end
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { visible(lines[i]), hl } }
  end
  api.nvim_buf_set_extmark(bufnr, ns, s.row, s.col, {
    virt_text = first ~= "" and { { visible(first), hl } } or nil,
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
  bind_keys(bufnr)
end

-- Requests -------------------------------------------------------------------------------------

--- Cancel the request of `bufnr` (and the one waiting for its debounce). The live preview of
--- the hole it was denoising goes with it: a preview is shown only while its request runs.
---@param bufnr integer
---@param state diffusion_lsp.BufState
local function cancel(bufnr, state)
  if state.timer then
    state.timer:stop()
  end
  local request = state.request
  state.request = nil
  require("diffusion_lsp.preview").clear(bufnr)
  if request then
    local client = vim.lsp.get_client_by_id(request.client_id)
    if client then
      pcall(core().call, client, "cancel_request", request.id)
    end
  end
end

--- Whether a completion request of `bufnr` is running (its previews are drawn only then).
---@param bufnr integer
function M.requesting(bufnr)
  local state = buffers[bufnr]
  return state ~= nil and state.request ~= nil
end

--- Forget the suggestion and any request for `bufnr`.
function M.clear(bufnr)
  local state = buffers[bufnr]
  if state then
    cancel(bufnr, state)
    state.seq = state.seq + 1 -- answers still on their way are stale
    state.suggestion = nil
  end
  undraw(bufnr)
  require("diffusion_lsp.preview").clear(bufnr)
end

function M.clear_all()
  for bufnr in pairs(buffers) do
    M.clear(bufnr)
  end
end

--- The first item of an inlineCompletion result as a suggestion at the cursor, or nil.
---@return diffusion_lsp.Suggestion|nil
local function suggestion_from(bufnr, result, encoding, row, col)
  local items = result and (result.items or result) or {}
  for _, item in ipairs(items) do
    local text = type(item.insertText) == "table" and item.insertText.value or item.insertText
    if type(text) == "string" and text ~= "" then
      local start_row, start_col, end_row, end_col = row, col, row, col
      if item.range then
        start_row, start_col = to_byte_position(bufnr, item.range.start, encoding)
        end_row, end_col = to_byte_position(bufnr, item.range["end"], encoding)
      end
      if start_row == row and start_col <= col then
        -- Text the range covers before the cursor is already typed: show what follows it.
        local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
        local typed = line:sub(start_col + 1, col)
        if text:sub(1, #typed) == typed then
          return {
            row = row, col = col, end_row = end_row, end_col = math.max(end_col, col),
            text = text:sub(#typed + 1), tick = api.nvim_buf_get_changedtick(bufnr), item = item,
          }
        end
      end
    end
  end
  return nil
end

---@param bufnr integer
function M.request(bufnr)
  local state = buffers[bufnr]
  local client = state and vim.lsp.get_client_by_id(state.client_id)
  if not client or not core().enabled() or bufnr ~= api.nvim_get_current_buf() or not in_insert_mode() then
    return
  end
  cancel(bufnr, state)
  state.seq = state.seq + 1
  local seq = state.seq
  local row, col = cursor()
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = TRIGGER_AUTOMATIC }

  local function handler(err, result)
    if seq ~= state.seq then
      return -- a newer request, a change or a dismissal came after this one
    end
    state.request = nil
    require("diffusion_lsp.preview").clear(bufnr) -- answered: its preview, if any, is over
    if err or not in_insert_mode() or api.nvim_get_current_buf() ~= bufnr then
      return
    end
    local now_row, now_col = cursor()
    if now_row ~= row or now_col ~= col or api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return
    end
    local s = suggestion_from(bufnr, result, client.offset_encoding, row, col)
    if s then
      state.suggestion = s
      draw(bufnr, s)
      api.nvim_exec_autocmds("User", { pattern = "DiffusionLspSuggestion", modeline = false })
    end
  end

  local ok, id = core().call(client, "request", "textDocument/inlineCompletion", params, handler, bufnr)
  if ok and id then
    state.request = { client_id = client.id, id = id }
  end
end

---@param bufnr integer
local function schedule_request(bufnr)
  local state = buffers[bufnr]
  if not state then
    return
  end
  cancel(bufnr, state)
  state.seq = state.seq + 1
  state.timer = state.timer or vim.uv.new_timer()
  state.timer:start(core().config.debounce_ms, 0, vim.schedule_wrap(function()
    M.request(bufnr)
  end))
end

-- Following the user ---------------------------------------------------------------------------

--- The user typed the start of the suggestion: keep the rest shown. True when so.
---@param bufnr integer
---@param s diffusion_lsp.Suggestion
local function typed_along(bufnr, s, row, col)
  if row ~= s.row or col <= s.col then
    return false
  end
  local n = col - s.col
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
  if n >= #s.text or line:sub(s.col + 1, col) ~= s.text:sub(1, n) then
    return false
  end
  s.text = s.text:sub(n + 1)
  s.col, s.end_col = col, math.max(s.end_col + (s.end_row == row and n or 0), col)
  s.tick = api.nvim_buf_get_changedtick(bufnr)
  draw(bufnr, s)
  return true
end

local function on_change(args)
  local bufnr = args.buf
  local state = buffers[bufnr]
  if not state or not in_insert_mode() then
    return
  end
  local row, col = cursor()
  local s = state.suggestion
  if s and s.row == row and s.col == col and s.tick == api.nvim_buf_get_changedtick(bufnr) then
    return -- nothing moved (e.g. CursorMovedI after our own accept)
  end
  if s and typed_along(bufnr, s, row, col) then
    return
  end
  state.suggestion = nil
  undraw(bufnr)
  schedule_request(bufnr)
end

-- Accepting ------------------------------------------------------------------------------------

--- The part of `text` that accept_word / accept_line take.
---@param text string
---@param what "word"|"line"|"all"
function M.partial(text, what)
  if what == "word" then
    return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
  elseif what == "line" then
    return text:match("^[^\n]+") or text:match("^\n[^\n]*") or text
  end
  return text
end

--- Insert `text` at the cursor and put the cursor after it; returns the new cursor.
function M.insert_at_cursor(text)
  local row, col = cursor()
  return M.replace(0, row, col, row, col, text)
end

---@return integer, integer row and column after the inserted text
function M.replace(bufnr, row, col, end_row, end_col, text)
  local lines = vim.split(text, "\n", { plain = true })
  api.nvim_buf_set_text(bufnr, row, col, end_row, end_col, lines)
  local new_row = row + #lines - 1
  local new_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { new_row + 1, new_col })
  return new_row, new_col
end

--- Accept all of the suggestion, or its next word or line. False when none is shown.
---@param what "all"|"word"|"line"
function M.accept(what)
  local bufnr = api.nvim_get_current_buf()
  local state = buffers[bufnr]
  local s = state and state.suggestion
  if not s then
    return false
  end
  cancel(bufnr, state)
  undraw(bufnr)
  local part = M.partial(s.text, what)
  if part == s.text then
    state.suggestion = nil
    M.replace(bufnr, s.row, s.col, s.end_row, s.end_col, s.text)
    return true
  end
  -- Partial: insert only, keep the rest (and the range it replaces) for the next accept.
  local row, col = M.replace(bufnr, s.row, s.col, s.row, s.col, part)
  local newlines = select(2, part:gsub("\n", ""))
  if s.end_row == s.row then
    s.end_col = col + (s.end_col - s.col)
  end
  s.end_row = s.end_row + newlines
  s.row, s.col, s.text = row, col, s.text:sub(#part + 1)
  s.tick = api.nvim_buf_get_changedtick(bufnr)
  draw(bufnr, s)
  return true
end

--- Drop the suggestion, or the hole still denoising (its request and preview). False when
--- there was neither.
function M.dismiss()
  local bufnr = api.nvim_get_current_buf()
  local state = buffers[bufnr]
  local shown = state ~= nil and (state.suggestion ~= nil or state.request ~= nil)
  M.clear(bufnr)
  return shown
end

---@param bufnr integer
---@return string|nil
function M.suggestion(bufnr)
  local state = buffers[bufnr]
  return state and state.suggestion and state.suggestion.text or nil
end

--- The item the server sent for the suggestion shown, as received (for tests).
function M.item(bufnr)
  local state = buffers[bufnr or api.nvim_get_current_buf()]
  return state and state.suggestion and state.suggestion.item or nil
end

-- Wiring ---------------------------------------------------------------------------------------

function M.attach(bufnr, client_id)
  buffers[bufnr] = buffers[bufnr] or { seq = 0 }
  buffers[bufnr].client_id = client_id
  if bufnr == api.nvim_get_current_buf() and in_insert_mode() then
    schedule_request(bufnr)
  end
end

function M.detach(bufnr)
  local state = buffers[bufnr]
  if state then
    M.clear(bufnr)
    if state.timer then
      state.timer:close()
    end
    buffers[bufnr] = nil
  end
end

--- The model just became ready: ask for the buffer being edited, if it is one of the server's.
function M.on_ready(client_id)
  local bufnr = api.nvim_get_current_buf()
  local state = buffers[bufnr]
  if state and state.client_id == client_id and in_insert_mode() and not state.suggestion then
    schedule_request(bufnr)
  end
end

function M.setup(group)
  api.nvim_create_autocmd({ "InsertEnter", "TextChangedI", "TextChangedP", "CursorMovedI" }, {
    group = group,
    callback = on_change,
  })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = function(args) M.clear(args.buf) end,
  })
  api.nvim_create_autocmd("BufUnload", {
    group = group,
    callback = function(args) M.detach(args.buf) end,
  })
end

return M
