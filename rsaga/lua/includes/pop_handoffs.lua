--[[
  Take the entries other consumers handed to `consumer` (see read_batch.lua)
  and return them in log order, each as {id, fields}. An entry someone else
  has reclaimed since, or that is no longer pending, is skipped.
]]
local function pop_handoffs(log, handoffs, group, consumer)
  local ids = redis.call('HGET', handoffs, consumer)
  if not ids then
    return {}
  end
  redis.call('HDEL', handoffs, consumer)
  local entries = {}
  for id in string.gmatch(ids, '%S+') do
    local pending = redis.call('XPENDING', log, group, id, id, 1)
    if pending[1] and pending[1][2] == consumer then
      local found = redis.call('XRANGE', log, id, id)
      if #found == 1 then
        entries[#entries + 1] = found[1]
      end
    end
  end
  return entries
end
