--[[
  Tell the group this consumer is alive (by the server's clock), so nobody takes
  over its entries while its handlers run; or, when it stops, that it is gone,
  so others take over what it leaves at once.

  Input:
    KEYS[1] alive (consumer -> last seen ms)
    ARGV[1] consumer   ARGV[2] 'alive' or 'gone'

  Output:
    the time recorded (0 for gone)
]]
-- @include "now_ms"

local seen = ARGV[2] == 'alive' and now_ms() or 0
redis.call('HSET', KEYS[1], ARGV[1], seen)
return seen
