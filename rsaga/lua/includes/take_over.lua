--[[
  Take over everything a dead consumer of a group holds: claim all its pending
  entries (in log order, so per-stream order survives), make this consumer the
  owner of their streams, and delete the dead consumer. Claiming all of them at
  once matters: claiming only some would let newer entries of a stream run
  before older ones still pending on the dead consumer.

  Delivery counts feed the dead-letter decision, so they count crashes fairly:
  - a consumer that said it left (alive = 0, a graceful stop) crashed on
    nothing: no count goes up;
  - if it was running one suspect entry alone (its alive hash names it under
    "running:<consumer>"), only that entry's count goes up; "-" there means
    another group of the same process was running one, so nothing here counts;
  - else every entry it held counts one more delivery.

  Appends the entries ({id, fields} in log order) to `entries`, and how often
  each has been delivered, this delivery included, to `deliveries`.
]]
-- @include "entry_field"

local function take_over(log, group, owners, alive, handoffs, me, dead, entries, deliveries)
  local culprit = redis.call('HGET', alive, 'running:' .. dead)
  local left = redis.call('HGET', alive, dead) == '0' 
  while true do
    local pending = redis.call('XPENDING', log, group, '-', '+', 500, dead)
    if #pending == 0 then
      break
    end
    for _, item in ipairs(pending) do
      local id, count = item[1], item[4]
      if (not left) and ((not culprit) or id == culprit) then
        count = count + 1
      end
      local claimed = redis.call('XCLAIM', log, group, me, 0, id, 'RETRYCOUNT', count)
      local entry = claimed[1]
      if entry and entry[2] then
        local stream_id = entry_field(entry[2], 's')
        if stream_id and stream_id ~= '' then
          redis.call('HSET', owners, stream_id, me)
        end
        entries[#entries + 1] = entry
        deliveries[#deliveries + 1] = count
      end
    end
  end
  redis.call('HDEL', alive, dead, 'running:' .. dead)
  redis.call('HDEL', handoffs, dead)
  redis.call('XGROUP', 'DELCONSUMER', log, group, dead)
end
