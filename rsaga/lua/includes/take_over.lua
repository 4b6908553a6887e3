--[[
  Take over everything a dead consumer of a group holds: all its pending
  entries (in log order, so per-stream order survives) and the ownership of
  their streams, then delete the dead consumer. Claiming all of them at once
  matters: claiming only some would let newer entries of a stream run before
  older ones still pending on the dead consumer.

  The dead consumer's streams are spread over the group's live consumers
  (round robin, this one first), so its backlog drains on every worker instead
  of piling onto the one that noticed the death: a stream given to another
  consumer is claimed over to it and queued in its handoffs, the rest are
  returned to the caller.

  Delivery counts feed the dead-letter decision, so they count crashes fairly:
  only an entry some handler had started (its id is in the dead consumer's
  "running:<consumer>" field, see GroupConsumer.record_started) gets one more delivery,
  and none does if the consumer said it left (alive = 0, a graceful stop).
  Entries it merely held (read ahead, handed to it, taken over by it) never
  count, whatever happened to it.

  Appends the entries returned to the caller ({id, fields} in log order) to
  `entries`, and how often each has been delivered, this delivery included, to
  `deliveries`.
]]
-- @include "record_fields"
-- @include "entry_field"

local function live_consumers(alive, me, dead, now, timeout_ms)
  local live = {me}
  local known = redis.call('HGETALL', alive)
  for i = 1, #known, 2 do
    local name, seen = known[i], tonumber(known[i + 1])
    if name ~= me and name ~= dead and string.sub(name, 1, 8) ~= 'running:'
        and seen and seen > 0 and now - seen <= timeout_ms then
      live[#live + 1] = name
    end
  end
  return live
end

local function take_over(log, group, owners, alive, handoffs, me, dead, entries, deliveries,
                         now, timeout_ms)
  local started = {}
  for id in string.gmatch(redis.call('HGET', alive, 'running:' .. dead) or '', '%S+') do
    started[id] = true
  end
  local left = redis.call('HGET', alive, dead) == '0'
  local live = live_consumers(alive, me, dead, now, timeout_ms)
  local taker_of, streams, handed = {}, 0, {}
  while true do
    local pending = redis.call('XPENDING', log, group, '-', '+', 500, dead)
    if #pending == 0 then
      break
    end
    for _, item in ipairs(pending) do
      local id, count = item[1], item[4]
      if started[id] and not left then
        count = count + 1
      end
      local stream_id = nil
      local found = redis.call('XRANGE', log, id, id)
      if found[1] then
        stream_id = entry_field(found[1][2], RECORD.stream)
      end
      local taker = me
      if stream_id and stream_id ~= '' then
        taker = taker_of[stream_id]
        if not taker then
          taker = live[streams % #live + 1]
          streams = streams + 1
          taker_of[stream_id] = taker
          redis.call('HSET', owners, stream_id, taker)
        end
      end
      local claimed = redis.call('XCLAIM', log, group, taker, 0, id, 'RETRYCOUNT', count)
      local entry = claimed[1]
      if entry and entry[2] then
        if taker == me then
          entries[#entries + 1] = entry
          deliveries[#deliveries + 1] = count
        else
          local ids = handed[taker]
          if not ids then
            ids = {}
            handed[taker] = ids
          end
          ids[#ids + 1] = id
        end
      end
    end
  end
  for taker, ids in pairs(handed) do
    local queued = redis.call('HGET', handoffs, taker)
    local added = table.concat(ids, ' ')
    redis.call('HSET', handoffs, taker, queued and (queued .. ' ' .. added) or added)
  end
  redis.call('HDEL', alive, dead, 'running:' .. dead)
  redis.call('HDEL', handoffs, dead)
  redis.call('XGROUP', 'DELCONSUMER', log, group, dead)
end
