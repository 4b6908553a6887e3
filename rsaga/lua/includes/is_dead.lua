--[[
  Whether `consumer` of a group has been silent for longer than `timeout_ms`
  (or never said it was alive), by the server's clock.
]]
local function is_dead(alive, consumer, now, timeout_ms)
  local seen = redis.call('HGET', alive, consumer)
  return (not seen) or (now - tonumber(seen) > timeout_ms)
end
