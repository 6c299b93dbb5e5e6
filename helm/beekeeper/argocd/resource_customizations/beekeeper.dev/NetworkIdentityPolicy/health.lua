-- Argo CD health of a beekeeper.dev NetworkIdentityPolicy (argocd-cm key
-- resource.customizations.health.beekeeper.dev_NetworkIdentityPolicy). Reads what kstatus
-- reads, so Argo CD and Flux agree: a status older than the spec is Progressing, Stalled
-- (the policy is invalid, or its node state cannot be written) is Degraded, Reconciling
-- (nodes not enforcing it yet) is Progressing, Ready is Healthy. Lua 5.1 (gopher-lua),
-- base library only.
local hs = {}
local generation = obj.metadata.generation or 0
if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Deleting"
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
elseif found.Valid ~= nil and found.Valid.status == "False" then
  -- A status written by an operator from before Stalled existed.
  hs.status = "Degraded"
  hs.message = said(found.Valid)
elseif found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = said(found.Reconciling)
elseif found.Ready ~= nil and found.Ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(found.Ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
end
return hs
