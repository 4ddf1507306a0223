-- Argo CD health check for edgefleet.io/EdgeModel.
--
-- Install it in argocd-cm under resource.customizations.health.edgefleet.io_EdgeModel (see
-- argocd-cm.yaml beside this file). Argo CD runs it with gopher-lua (Lua 5.1) and the object as
-- the global `obj`; it returns `hs` with `status` (Healthy, Progressing, Degraded or Suspended) and
-- a `message`. It reads the conditions the EdgeFleet operator writes (see README.md):
--
--   being deleted                                   -> Progressing
--   no status yet, or spec generation not observed  -> Progressing
--   Stalled=True (spec error, failed/rolled back)   -> Degraded
--   Degraded=True (a rollout failed its gate)       -> Degraded
--   Ready=True and not Reconciling                  -> Healthy
--   spec.paused or rolloutPhase Paused              -> Suspended
--   otherwise (Reconciling=True, Ready=False, ...)  -> Progressing
--
-- Any field may be missing or of the wrong type: the check never raises, it says Progressing.

local hs = {}

local function field(value, name)
  if type(value) == "table" then
    return value[name]
  end
  return nil
end

local function condition(conditions, condition_type)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(conditions) do
    if type(c) == "table" and c.type == condition_type then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function message_of(c, fallback)
  if c ~= nil and type(c.message) == "string" and c.message ~= "" then
    return c.message
  end
  if c ~= nil and type(c.reason) == "string" and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local metadata = field(obj, "metadata")
local spec = field(obj, "spec")
local status = field(obj, "status")

if field(metadata, "deletionTimestamp") ~= nil then
  hs.status = "Progressing"
  hs.message = "EdgeModel is being deleted: its devices are told to remove it"
  return hs
end

if type(status) ~= "table" then
  hs.status = "Progressing"
  hs.message = "Waiting for the EdgeFleet operator to report a status"
  return hs
end

local generation = field(metadata, "generation")
local observed = status.observedGeneration
if type(generation) == "number" and observed ~= generation then
  hs.status = "Progressing"
  if type(observed) == "number" then
    hs.message = "Waiting for the operator to observe generation " .. generation .. " (it has seen " .. observed .. ")"
  else
    hs.message = "Waiting for the operator to observe generation " .. generation
  end
  return hs
end

local conditions = status.conditions
local stalled = condition(conditions, "Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = message_of(stalled, "Stalled")
  return hs
end

local degraded = condition(conditions, "Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = message_of(degraded, "a rollout failed its health gate")
  return hs
end

local ready = condition(conditions, "Ready")
local reconciling = condition(conditions, "Reconciling")
if is_true(ready) and not is_true(reconciling) then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Ready")
  return hs
end

if field(spec, "paused") == true or status.rolloutPhase == "Paused" then
  hs.status = "Suspended"
  hs.message = message_of(reconciling, "rollout paused (spec.paused)")
  return hs
end

hs.status = "Progressing"
if is_true(reconciling) then
  hs.message = message_of(reconciling, "Reconciling")
elseif ready ~= nil then
  hs.message = message_of(ready, "Not ready")
else
  hs.message = "Waiting for the EdgeFleet operator to report conditions"
end
return hs
