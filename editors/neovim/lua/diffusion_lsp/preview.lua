-- Live denoising: draw the server's `diffusion/preview` notifications while a hole denoises.
--
-- Each notification carries the hole as it stands: committed text, and one placeholder
-- character (U+2591 LIGHT SHADE) per still-masked token. The hole is drawn where the completion
-- will go, committed text as ghost text (DiffusionLspSuggestion), masked places dim
-- (DiffusionLspMasked); the first line inline, the others as virtual lines. The last one
-- (`done = true`) clears the drawing: the completion's own ghost text takes its place; so does
-- the end of its request in any other way (an answer with no previews, from the server's cache;
-- a change, a dismissal, `:DiffusionLsp disable`: lua/diffusion_lsp/ghost.lua). The
-- server sends previews only when the `completion.preview` setting is on (this plugin turns it
-- on unless you set it).

local api = vim.api
local M = {}

local ns = api.nvim_create_namespace("diffusion_lsp.preview")
M.ns = ns
M.PLACEHOLDER = "\226\150\145" -- U+2591 in UTF-8 (LuaJIT has no \u{} escapes)
M.HISTORY = 64 -- frames kept in M.history (tests, recordings)

---@class diffusion_lsp.Frame
---@field step integer
---@field steps integer
---@field text string
---@field done boolean
---@field chunks table[]|nil   what was drawn: { {text, hl}, ... } of the first line

---@type diffusion_lsp.Frame[]
M.history = {}

--- `line` as virtual-text chunks: runs of placeholders dim, the rest as ghost text.
---@param line string
---@return table[]
function M.chunks(line)
  local out = {}
  local i = 1
  while i <= #line do
    local s, e = line:find(M.PLACEHOLDER, i, true)
    if s == nil then
      out[#out + 1] = { line:sub(i), "DiffusionLspSuggestion" }
      break
    end
    if s > i then
      out[#out + 1] = { line:sub(i, s - 1), "DiffusionLspSuggestion" }
    end
    local run_end = e
    while line:sub(run_end + 1, run_end + #M.PLACEHOLDER) == M.PLACEHOLDER do
      run_end = run_end + #M.PLACEHOLDER
    end
    out[#out + 1] = { line:sub(s, run_end), "DiffusionLspMasked" }
    i = run_end + 1
  end
  for _, chunk in ipairs(out) do
    chunk[1] = chunk[1]:gsub("\t", string.rep(" ", vim.bo.tabstop))
  end
  return out
end

local keys = require("diffusion_lsp.keys")

---@param bufnr integer
function M.clear(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
  keys.unbind(bufnr, "preview")
end

local function remember(frame)
  M.history[#M.history + 1] = frame
  if #M.history > M.HISTORY then
    table.remove(M.history, 1)
  end
  api.nvim_exec_autocmds("User", { pattern = "DiffusionLspPreview", modeline = false, data = frame })
end

--- The `diffusion/preview` handler.
function M.on_preview(_, params, ctx)
  if type(params) ~= "table" or type(params.textDocument) ~= "table" then
    return
  end
  local bufnr = vim.uri_to_bufnr(params.textDocument.uri)
  if not api.nvim_buf_is_loaded(bufnr) then
    return
  end
  M.clear(bufnr)
  local frame = { step = params.step, steps = params.steps, text = params.text, done = params.done }
  local versions = vim.lsp.util.buf_versions
  local version = versions and versions[bufnr]
  local stale = version ~= nil and params.textDocument.version ~= nil and params.textDocument.version ~= version
  -- a preview arriving after its request ended (cancelled, answered, dismissed) is not drawn
  local orphan = not require("diffusion_lsp").uses_builtin()
    and not require("diffusion_lsp.ghost").requesting(bufnr)
  if params.done or stale or orphan or api.nvim_get_mode().mode:sub(1, 1) ~= "i" then
    remember(frame)
    return
  end
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  local encoding = client and client.offset_encoding or "utf-16"
  local row = params.position.line
  local line = api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1]
  if line == nil then
    return
  end
  local ok, col = pcall(vim.lsp.util._get_line_byte_from_position or function(_, pos)
    return math.min(pos.character, #line)
  end, bufnr, params.position, encoding)
  col = ok and math.min(col, #line) or #line
  local lines = vim.split(params.text or "", "\n", { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = M.chunks(lines[i])
  end
  frame.chunks = M.chunks(lines[1])
  api.nvim_buf_set_extmark(bufnr, ns, row, col, {
    virt_text = #frame.chunks > 0 and frame.chunks or nil,
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
  -- the dismiss key drops the hole while it denoises, as it drops the suggestion after
  keys.bind(bufnr, "preview", { "i" }, require("diffusion_lsp").config.keys.dismiss,
    require("diffusion_lsp.ghost").dismiss, "dismiss the suggestion")
  remember(frame)
end

function M.setup(group)
  api.nvim_set_hl(0, "DiffusionLspMasked", { link = "NonText", default = true })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    callback = function(args) M.clear(args.buf) end,
  })
end

return M
