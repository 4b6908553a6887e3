--[[
  The current version of an event stream: its length, since event streams are
  never trimmed and entry ids are <version>-0; and whether it is a tombstone.

  A removed process's stream (remove_expired.lua) is a string key holding one
  envelope, its tombstone: version 1 (a one-entry stream would cost ~4.7 KB,
  a stream's first node being preallocated; the string ~170 bytes).
]]
local function stream_version(key)
  local length = redis.pcall('XLEN', key)
  if type(length) == 'table' then  -- WRONGTYPE: a tombstone
    return 1, true
  end
  return length, false
end
