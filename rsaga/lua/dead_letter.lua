--[[
  Move one log entry to the shard's dead letters: add the dead letter, then
  acknowledge the entry for its group (releasing the stream like ack_batch.lua).
  Both happen or neither does, so an entry is never both lost and unrecorded.
  If another consumer has taken the entry over, nothing happens: it is theirs.

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] in-flight counts   KEYS[4] dead letters
    ARGV[1] group   ARGV[2] consumer   ARGV[3] entry id   ARGV[4] stream id ('' if none)
    ARGV[5] dead-letter stream max length (approximate)
    ARGV[6 ..] the dead letter's field/value pairs

  Output:
    the id of the dead-letter entry, or '' if the entry is not this consumer's
]]
-- @include "release_entries"

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not pending[1] or pending[1][2] ~= ARGV[2] then
  return ''
end
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
release_entries(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], {ARGV[3]}, {ARGV[4]})
return id
