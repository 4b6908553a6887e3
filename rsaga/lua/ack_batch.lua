--[[
  Acknowledge a batch of log entries for one consumer of a group, releasing its
  hold on each stream whose last in-flight entry this was, and take (up to a
  limit) the entries other consumers handed to it meanwhile. Entries another
  consumer has taken over are not acknowledged (see release_entries).

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] in-flight counts   KEYS[4] handoffs
    ARGV[1] group   ARGV[2] consumer   ARGV[3] most handed entries to take
    ARGV[4 ..] pairs: entry id, stream id ('' for an entry without one)

  Output:
    {acknowledged, handed, deliveries}   the number of entries this call
                                         acknowledged, the handed entries as
                                         {id, fields} in log order, and how
                                         often each has been delivered.
]]
-- @include "release_entries"
-- @include "pop_handoffs"

local log, owners, counts, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me = ARGV[1], ARGV[2]
local ids, stream_ids = {}, {}
for i = 4, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  stream_ids[#stream_ids + 1] = ARGV[i + 1]
end
local acknowledged = release_entries(log, owners, counts, group, me, ids, stream_ids)
local handed, deliveries = pop_handoffs(log, handoffs, group, me, tonumber(ARGV[3]))
return {acknowledged, handed, deliveries}
