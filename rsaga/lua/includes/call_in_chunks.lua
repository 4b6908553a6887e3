--[[
  redis.call(command, key, [prefix,] items...) in chunks of 1000 items: Lua's
  unpack cannot spread more than a few thousand values.
]]
local function call_in_chunks(command, key, items, prefix)
  for first = 1, #items, 1000 do
    local last = math.min(first + 999, #items)
    if prefix then
      redis.call(command, key, prefix, unpack(items, first, last))
    else
      redis.call(command, key, unpack(items, first, last))
    end
  end
end
