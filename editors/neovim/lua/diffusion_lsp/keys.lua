-- Keys that exist only while there is something to act on. A key is mapped buffer-local when a
-- suggestion or a next edit is drawn and unmapped when it goes, so the plugin takes no key
-- globally: with nothing shown, a key is whatever it was before (Vim's own meaning, or the
-- user's mapping, e.g. a completion plugin's <Tab>), and keys replayed from a macro or fed at
-- once are typed in place. A buffer-local mapping of the same key the user had is put back.
--
-- Two owners (the ghost text, next edits) may bind the same key: the first that acts wins.

local api = vim.api
local M = {}

---@class diffusion_lsp.Binding
---@field saved table|nil             the user's buffer-local mapping of the key (maparg dict)
---@field mode string
---@field lhs string
---@field owners table<string, {run: fun(): boolean, order: integer}>

---@type table<integer, table<string, diffusion_lsp.Binding>>  bufnr -> mode .. "\0" .. lhs
local bound = {}
local order = 0

local function key(mode, lhs)
  return mode .. "\0" .. vim.keycode(lhs)
end

--- The user's buffer-local mapping of `lhs` in `mode` in `bufnr`, as maparg() gives it.
local function buffer_mapping(bufnr, mode, lhs)
  return api.nvim_buf_call(bufnr, function()
    local found = vim.fn.maparg(lhs, mode, false, true)
    return (found.buffer == 1) and found or nil
  end)
end

local function unmap(bufnr, binding)
  if not api.nvim_buf_is_valid(bufnr) then
    return
  end
  pcall(vim.keymap.del, binding.mode, binding.lhs, { buffer = bufnr })
  if binding.saved then
    api.nvim_buf_call(bufnr, function() vim.fn.mapset(binding.mode, false, binding.saved) end)
  end
end

--- Run the owners of a key in the order they bound it; none acting (stale state) types the
--- key in place through whatever it meant before.
local function press(bufnr, mode, lhs)
  local binding = (bound[bufnr] or {})[key(mode, lhs)]
  if binding then
    local owners = vim.tbl_values(binding.owners)
    table.sort(owners, function(a, b) return a.order < b.order end)
    for _, owner in ipairs(owners) do
      if owner.run() then
        return
      end
    end
    bound[bufnr][key(mode, lhs)] = nil
    unmap(bufnr, binding)
  end
  api.nvim_feedkeys(vim.keycode(lhs), "im", false) -- "i": in place, before any pending keys
end

--- Map `lhs` (false: not at all) in `modes` of `bufnr` to `run` for `owner` until unbound.
---@param bufnr integer
---@param owner string
---@param modes string[]
---@param lhs string|false
---@param run fun(): boolean  true when it acted
---@param desc string
function M.bind(bufnr, owner, modes, lhs, run, desc)
  if not lhs or not api.nvim_buf_is_valid(bufnr) then
    return
  end
  bound[bufnr] = bound[bufnr] or {}
  for _, mode in ipairs(modes) do
    local id = key(mode, lhs)
    local binding = bound[bufnr][id]
    if not binding then
      binding = { saved = buffer_mapping(bufnr, mode, lhs), mode = mode, lhs = lhs, owners = {} }
      bound[bufnr][id] = binding
      vim.keymap.set(mode, lhs, function() press(bufnr, mode, lhs) end,
        { buffer = bufnr, desc = "diffusion-lsp: " .. desc, silent = true, nowait = true })
    end
    if not binding.owners[owner] then
      order = order + 1
      binding.owners[owner] = { run = run, order = order }
    end
  end
end

--- Drop every key `owner` bound in `bufnr`; a key nobody holds any more is unmapped.
---@param bufnr integer
---@param owner string
function M.unbind(bufnr, owner)
  for id, binding in pairs(bound[bufnr] or {}) do
    if binding.owners[owner] then
      binding.owners[owner] = nil
      if next(binding.owners) == nil then
        bound[bufnr][id] = nil
        unmap(bufnr, binding)
      end
    end
  end
  if bound[bufnr] and next(bound[bufnr]) == nil then
    bound[bufnr] = nil
  end
end

--- The keys the plugin holds in `bufnr` now (tests): { "i <Tab>", ... }.
function M.held(bufnr)
  local out = {}
  for _, binding in pairs(bound[bufnr or api.nvim_get_current_buf()] or {}) do
    out[#out + 1] = binding.mode .. " " .. binding.lhs
  end
  table.sort(out)
  return out
end

return M
