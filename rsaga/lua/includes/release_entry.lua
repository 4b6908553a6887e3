--[[
  Acknowledge log entries for a group, those still pending on `consumer`, and
  release that consumer's hold on their streams: each stream's in-flight count
  drops by its entries acknowledged, and at zero nobody owns the stream.
  An entry another consumer has taken over is left alone: that consumer runs
  it now, and acknowledging it here would release a stream it holds.
  One XPENDING over the ids' range finds which are still the consumer's, one
  XACK acknowledges them all, one HINCRBY per stream counts them down.
  Returns how many entries this call acknowledged.
]]
-- @include "id_less"
-- @include "call_in_chunks"

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

local function release_entries(log, owners, counts, group, consumer, ids, stream_ids)
  if #ids == 0 then
    return 0
  end
  local mine = pending_on(log, group, consumer, ids)
  local acknowledged, released, streams = {}, {}, {}
  for i, id in ipairs(ids) do
    if mine[id] then
      mine[id] = nil  -- an id listed twice is acknowledged once
      acknowledged[#acknowledged + 1] = id
      local stream_id = stream_ids[i]
      if stream_id ~= '' then
        if not released[stream_id] then
          released[stream_id] = 0
          streams[#streams + 1] = stream_id
        end
        released[stream_id] = released[stream_id] + 1
      end
    end
  end
  if #acknowledged == 0 then
    return 0
  end
  call_in_chunks('XACK', log, acknowledged, group)
  local idle = {}
  for _, stream_id in ipairs(streams) do
    if redis.call('HINCRBY', counts, stream_id, -released[stream_id]) <= 0 then
      idle[#idle + 1] = stream_id
    end
  end
  if #idle > 0 then
    call_in_chunks('HDEL', counts, idle)
    call_in_chunks('HDEL', owners, idle)
  end
  return #acknowledged
end

local function release_entry(log, owners, counts, group, consumer, id, stream_id)
  return release_entries(log, owners, counts, group, consumer, {id}, {stream_id})
end
