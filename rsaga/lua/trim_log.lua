--[[
  Trim a shard log of entries that every consumer group has acknowledged and
  that are older than the retention period (by the Redis server's clock).
  A log no group reads is left alone.

  Input:
    KEYS[1] shard log
    ARGV[1] retention ms

  Output:
    the number of entries removed
]]
-- @include "now_ms"
-- @include "id_less"

local log = KEYS[1]
if redis.call('EXISTS', log) == 0 then
  return 0
end
local groups = redis.call('XINFO', 'GROUPS', log)
if #groups == 0 then
  return 0
end

local keep_from = string.format('%d-0', now_ms() - tonumber(ARGV[1]))
for _, info in ipairs(groups) do
  local name, last_delivered, pending
  for i = 1, #info, 2 do
    if info[i] == 'name' then name = info[i + 1] end
    if info[i] == 'last-delivered-id' then last_delivered = info[i + 1] end
    if info[i] == 'pending' then pending = info[i + 1] end
  end
  local bound = last_delivered
  if pending > 0 then
    local summary = redis.call('XPENDING', log, name)
    if summary[2] and id_less(summary[2], bound) then
      bound = summary[2]
    end
  end
  if id_less(bound, keep_from) then
    keep_from = bound
  end
end
return redis.call('XTRIM', log, 'MINID', keep_from)
