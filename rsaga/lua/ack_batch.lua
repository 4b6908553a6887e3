--[[
  Acknowledge a batch of log entries for one consumer of a group, releasing its
  hold on each stream whose last in-flight entry this was; record which entries
  its handlers have started and not yet acknowledged (the only ones a crash of
  this consumer may be blamed on, see includes/take_over.lua); and take (up to
  a limit) the entries other consumers handed to it meanwhile. Entries another
  consumer has taken over are not acknowledged (see release_entry).

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] in-flight counts   KEYS[4] handoffs
    KEYS[5] alive (consumer -> last seen ms; running:<consumer> -> started ids)
    ARGV[1] group   ARGV[2] consumer   ARGV[3] most handed entries to take
    ARGV[4] the ids of the entries started and not acknowledged, space-separated
    ARGV[5 ..] pairs: entry id, stream id ('' for an entry without one)

  Output:
    {acknowledged, handed, deliveries}   the number of entries this call
                                         acknowledged, the handed entries as
                                         {id, fields} in log order, and how
                                         often each has been delivered.
]]
-- @include "release_entry"
-- @include "pop_handoffs"

local log, owners, counts, handoffs, alive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, me = ARGV[1], ARGV[2]
local acknowledged = 0
for i = 5, #ARGV, 2 do
  acknowledged = acknowledged + release_entry(log, owners, counts, group, me, ARGV[i], ARGV[i + 1])
end
if ARGV[4] == '' then
  redis.call('HDEL', alive, 'running:' .. me)
else
  redis.call('HSET', alive, 'running:' .. me, ARGV[4])
end
local handed, deliveries = pop_handoffs(log, handoffs, group, me, tonumber(ARGV[3]))
return {acknowledged, handed, deliveries}
