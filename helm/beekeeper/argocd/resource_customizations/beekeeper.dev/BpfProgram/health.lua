-- Argo CD health of a beekeeper.dev BpfProgram (argocd-cm key
-- resource.customizations.health.beekeeper.dev_BpfProgram). Reads what kstatus reads, so
-- Argo CD and Flux agree: a status older than the spec is Progressing, Stalled (a program
-- failed or a metric is not exported) is Degraded, Reconciling (nodes still at work) is
-- Progressing, Ready is Healthy. Lua 5.1 (gopher-lua), base library only.
local hs = {}
local generation = obj.metadata.generation or 0
if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting: waiting for every node to detach the programs"
  return hs
end
if obj.status == nil or obj.status.observedGeneration == nil or obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the beekeeper operator to observe generation " .. generation
  return hs
end
local found = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  found[condition.type] = condition
end
local function said(condition)
  local message = condition.message or ""
  if message == "" then
    return condition.reason
  end
  if string.sub(message, 1, string.len(condition.reason)) == condition.reason then
    return message
  end
  return condition.reason .. ": " .. message
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(found.Stalled)
elseif found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = "Ready on " .. (obj.status.ready or "0/0") .. " nodes: " .. said(found.Reconciling)
elseif found.Ready ~= nil and found.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(found.Ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
end
return hs
