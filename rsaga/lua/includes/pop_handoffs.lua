--[[
  Take up to `limit` of the entries other consumers handed to `consumer` (see
  read_batch.lua and take_over.lua), oldest first, and return them in log
  order, each as {id, fields}, with how often each has been delivered, plus
  whether more stay queued. An entry someone else has taken over since, or that
  is no longer pending, is skipped. While some stay queued the consumer must
  not read new entries: they would overtake the queued ones.
]]
local function pop_handoffs(log, handoffs, group, consumer, limit)
  local queued = redis.call('HGET', handoffs, consumer)
  if not queued then
    return {}, {}, false
  end
  local entries, deliveries, rest, taken = {}, {}, {}, 0
  for id in string.gmatch(queued, '%S+') do
    if taken < limit then
      taken = taken + 1
      local pending = redis.call('XPENDING', log, group, id, id, 1)
      if pending[1] and pending[1][2] == consumer then
        local found = redis.call('XRANGE', log, id, id)
        if #found == 1 then
          entries[#entries + 1] = found[1]
          deliveries[#deliveries + 1] = pending[1][4]
        end
      end
    else
      rest[#rest + 1] = id
    end
  end
  if #rest == 0 then
    redis.call('HDEL', handoffs, consumer)
  else
    redis.call('HSET', handoffs, consumer, table.concat(rest, ' '))
  end
  return entries, deliveries, #rest > 0
end
