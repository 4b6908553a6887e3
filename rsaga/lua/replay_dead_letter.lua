--[[
  Put a dead letter back on its shard log for its handler only, and remove it
  from the dead letters, atomically.

  Input:
    KEYS[1] dead letters   KEYS[2] shard log
    ARGV[1] dead-letter id

  Output:
    the new log entry id, '' if there is no such dead letter, or '-' if it
    records a failure with no event to replay (a process that failed)
]]
-- @include "entry_field"

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return ''
end
local fields = found[1][2]
if not entry_field(fields, 'd') then
  return '-'
end
local stream_id = entry_field(fields, 's')
local log_fields = {'g', entry_field(fields, 'handler'), 'r', ARGV[1]}
if stream_id then
  log_fields[#log_fields + 1] = 's'
  log_fields[#log_fields + 1] = stream_id
end
for _, name in ipairs({'v', 'd'}) do
  local value = entry_field(fields, name)
  if value then
    log_fields[#log_fields + 1] = name
    log_fields[#log_fields + 1] = value
  end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(log_fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
