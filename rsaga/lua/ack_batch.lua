--[[
  Acknowledge a batch of log entries for one consumer of a group, releasing its
  hold on each stream whose last in-flight entry this was, and take the entries
  other consumers handed to it meanwhile.

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] in-flight counts   KEYS[4] handoffs
    ARGV[1] group   ARGV[2] consumer
    ARGV[3 ..] pairs: entry id, stream id ('' for an entry without one)

  Output:
    {acknowledged, handed}   the number of entries that were still pending, and
                             the handed entries as {id, fields} in log order.
]]
-- @include "release_entry"
-- @include "pop_handoffs"

local log, owners, counts, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group = ARGV[1]
local acknowledged = 0
for i = 3, #ARGV, 2 do
  acknowledged = acknowledged + release_entry(log, owners, counts, group, ARGV[i], ARGV[i + 1])
end
return {acknowledged, pop_handoffs(log, handoffs, group, ARGV[2])}
