--[[
  Reclaim entries that stayed pending on some consumer of a group for longer
  than `min_idle` (their consumer died or hung), and take over their streams so
  later entries of those streams are handed to the new owner.

  Input:
    KEYS[1] shard log   KEYS[2] owners
    ARGV[1] group   ARGV[2] consumer   ARGV[3] min idle ms   ARGV[4] start id
    ARGV[5] count

  Output:
    {cursor, entries, deliveries}   entries as {id, fields}; deliveries[i] is how
                                    often entries[i] has been delivered, this
                                    time included. cursor '0-0' means done.
]]
-- @include "entry_field"

local log, owners, group, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local reply = redis.call('XAUTOCLAIM', log, group, me, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local entries, deliveries = {}, {}
for _, entry in ipairs(reply[2]) do
  if entry and entry[2] then
    local stream_id = entry_field(entry[2], 's')
    if stream_id then
      redis.call('HSET', owners, stream_id, me)
    end
    local pending = redis.call('XPENDING', log, group, entry[1], entry[1], 1)
    entries[#entries + 1] = entry
    deliveries[#deliveries + 1] = pending[1] and pending[1][4] or 1
  end
end
return {reply[1], entries, deliveries}
