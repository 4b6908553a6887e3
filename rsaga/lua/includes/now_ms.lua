--[[
  The Redis server's clock in milliseconds: the one clock every worker and
  scheduler agrees on, whatever their hosts' clocks say.
]]
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
