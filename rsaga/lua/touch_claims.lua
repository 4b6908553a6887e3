--[[
  Set the idle time of entries this consumer still holds: 0 keeps a running
  handler's claim fresh; a large value hands unfinished entries to whoever
  reclaims next (graceful shutdown). Entries another consumer has taken over
  are left alone.

  Input:
    KEYS[1] shard log
    ARGV[1] group   ARGV[2] consumer   ARGV[3] idle ms   ARGV[4 ..] entry ids

  Output:
    the ids this consumer no longer holds
]]
local log, group, me, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lost = {}
for i = 4, #ARGV do
  local pending = redis.call('XPENDING', log, group, ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == me then
    redis.call('XCLAIM', log, group, me, 0, ARGV[i], 'IDLE', idle, 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
