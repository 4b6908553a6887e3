--[[
  Which of `ids` (entries of `log`) are still pending on `consumer` in `group`,
  as a set: one XPENDING over the ids' range, filtered by consumer; if more of
  the consumer's entries lie in that range than it lists, one XPENDING per id.
]]
-- @include "id_less"

local function pending_on(log, group, consumer, ids)
  local low, high = ids[1], ids[1]
  for i = 2, #ids do
    if id_less(ids[i], low) then
      low = ids[i]
    elseif id_less(high, ids[i]) then
      high = ids[i]
    end
  end
  local limit = #ids * 4 + 64
  local found = {}
  local reply = redis.call('XPENDING', log, group, low, high, limit, consumer)
  for _, pending in ipairs(reply) do
    found[pending[1]] = true
  end
  if #reply >= limit then
    -- More of the consumer's entries lie in that range than were listed: ask per id.
    for _, id in ipairs(ids) do
      if not found[id] and redis.call('XPENDING', log, group, id, id, 1, consumer)[1] then
        found[id] = true
      end
    end
  end
  return found
end
