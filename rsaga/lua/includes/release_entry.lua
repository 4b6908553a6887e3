--[[
  Acknowledge one log entry for a group and, if this acknowledgement is the one
  that took it off the pending list, release the consumer's hold on its stream:
  the stream's in-flight count drops, and at zero nobody owns the stream.
  Returns 1 if the entry was pending, 0 if it had been acknowledged already.
]]
local function release_entry(log, owners, counts, group, id, stream_id)
  local acked = redis.call('XACK', log, group, id)
  if acked == 1 and stream_id ~= '' then
    if redis.call('HINCRBY', counts, stream_id, -1) <= 0 then
      redis.call('HDEL', counts, stream_id)
      redis.call('HDEL', owners, stream_id)
    end
  end
  return acked
end
