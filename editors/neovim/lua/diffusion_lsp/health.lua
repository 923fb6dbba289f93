-- :checkhealth diffusion_lsp — is the server there, running, and its model ready?

local M = {}

local STATS_TIMEOUT_MS = 3000
local DOCTOR_WAIT_MS = 10000 -- :checkhealth waits this long for the doctor (the editor stays live)

local function percentiles(stats)
  local latency = stats.latencyMs or {}
  if not latency.count or latency.count == 0 then
    return "no completions yet"
  end
  return ("%d completions, latency p50 %s ms, p95 %s ms"):format(
    latency.count, tostring(latency.p50), tostring(latency.p95))
end

function M.check()
  local health = vim.health
  local ok_plugin, plugin = pcall(require, "diffusion_lsp")
  health.start("diffusion-lsp")
  if not ok_plugin then
    health.error("the plugin did not load: " .. tostring(plugin))
    return
  end

  if vim.fn.has("nvim-0.10") ~= 1 then
    health.error("Neovim 0.10 or newer is needed")
    return
  end
  health.ok(("Neovim %s: ghost text drawn by %s"):format(
    tostring(vim.version()),
    plugin.uses_builtin() and "vim.lsp.inline_completion" or "this plugin (extmarks)"))

  local cmd = plugin.config.cmd
  if type(cmd) ~= "table" then
    cmd = { "(a Lua function)" }
    health.info("cmd is a function: the server runs inside Neovim")
  end
  local exe = type(plugin.config.cmd) == "table" and vim.fn.exepath(cmd[1]) or cmd[1]
  if exe == "" then
    health.error(("server `%s` not found"):format(cmd[1]), {
      "install it: pip install -e /path/to/diffusion-lsp (or scripts/run.sh in its repository)",
      "or point setup({ cmd = { '/path/to/.venv/bin/diffusion-lsp', 'serve' } }) at it",
    })
    return
  end
  health.ok(("server executable: %s"):format(exe))

  local clients = plugin.clients()
  if #clients == 0 then
    health.warn("server not running in this Neovim", {
      "open a file of a filetype it attaches to"
        .. (plugin.config.filetypes and (" (" .. table.concat(plugin.config.filetypes, ", ") .. ")") or ""),
      "or run :lua require('diffusion_lsp').attach()",
    })
    return
  end
  local client = clients[1]
  health.ok(("server started (client id %d, %s)"):format(client.id, table.concat(cmd, " ")))

  local reply = plugin.call(client, "request_sync", "diffusion/stats", vim.NIL, STATS_TIMEOUT_MS, 0)
  if not reply or reply.err then
    health.error("diffusion/stats failed: " .. vim.inspect(reply and reply.err or "timeout"))
    return
  end
  local stats = reply.result
  local where = tostring(stats.model)
  if stats.device and stats.device ~= vim.NIL and not where:find(stats.device, 1, true) then
    where = ("%s on %s"):format(where, stats.device)
  end
  if stats.modelReady then
    health.ok(("model ready: %s; %s"):format(where, percentiles(stats)))
  elseif stats.state == "loading" or stats.state == "starting" then
    health.warn("model still loading", { "wait a moment; the editor shows its progress" })
  elseif stats.state == "disabled" then
    health.warn("completions are disabled", { ":DiffusionLsp enable" })
  else
    local message = plugin.last_status and plugin.last_status.message or ""
    health.error(("model not ready (%s) %s"):format(tostring(stats.state), message),
      { ":DiffusionLsp log shows the server's log; check settings.model.path" })
  end

  health.start("diffusion-lsp doctor")
  local text, err, answered = nil, nil, false
  plugin.doctor(function(t, e) text, err, answered = t, e, true end)
  vim.wait(DOCTOR_WAIT_MS, function() return answered end, 50)
  if not answered then
    err = ("no answer within %d s"):format(DOCTOR_WAIT_MS / 1000)
  end
  if not text then
    health.warn("doctor: " .. tostring(err))
    return
  end
  for line in vim.gsplit(text, "\n", { plain = true }) do
    if line ~= "" then
      health.info(line)
    end
  end
end

return M
