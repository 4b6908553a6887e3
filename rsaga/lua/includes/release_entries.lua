--[[
  Acknowledge log entries for a group, those still pending on `consumer`, and
  release that consumer's hold on their streams: each stream's in-flight count
  drops by its entries acknowledged, and at zero nobody owns the stream.
  An entry another consumer has taken over is left alone: that consumer runs
  it now, and acknowledging it here would release a stream it holds.
  One XPENDING finds which are still the consumer's (see pending_on), one XACK
  acknowledges them all, one HINCRBY per stream counts them down.
  `ids` and `stream_ids` are parallel lists ('' for an entry without a stream).
  Returns how many entries this call acknowledged.
]]
-- @include "pending_on"
-- @include "call_in_chunks"

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
