--[[
  The current version of an event stream: its length, since event streams are
  never trimmed and entry ids are <version>-0.
]]
local function stream_version(key)
  return redis.call('XLEN', key)
end
