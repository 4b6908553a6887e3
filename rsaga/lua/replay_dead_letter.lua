--[[
  Put a dead letter back where it came from, for its group only, and remove it
  from the dead letters, atomically: an event goes back on the shard log, a
  due timeout (it has a payload, field p) back on the shard's due stream, so it
  fires into its process's `decide` again.

  Input:
    KEYS[1] dead letters   KEYS[2] shard log   KEYS[3] due stream
    ARGV[1] dead-letter id

  Output:
    the new entry id, '' if there is no such dead letter, or '-' if it records
    a failure with nothing to replay (a process that failed and escalated)
]]
-- @include "record_fields"
-- @include "entry_field"

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return ''
end
local fields = found[1][2]
local target, copied
if entry_field(fields, RECORD.payload) then
  target, copied = KEYS[3], {RECORD.stream, RECORD.type, RECORD.payload, RECORD.due}
elseif entry_field(fields, RECORD.data) then
  target, copied = KEYS[2], {RECORD.stream, RECORD.version, RECORD.data}
else
  return '-'
end
local replayed = {RECORD.group, entry_field(fields, 'handler'), RECORD.replay_of, ARGV[1]}
for _, name in ipairs(copied) do
  local value = entry_field(fields, name)
  if value then
    replayed[#replayed + 1] = name
    replayed[#replayed + 1] = value
  end
end
local id = redis.call('XADD', target, '*', unpack(replayed))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
