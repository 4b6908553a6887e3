--[[
  Field names of the records rsaga keeps in streams; rsaga/records.py names the
  same fields (a test compares them).
  Shard-log entry: stream, version, type, data (the envelope), and for a
  replayed dead letter group (only this group handles it) and replay_of.
  Due-timeout entry: stream, type (process type), payload, due.
  Process stream entry (id <version>-0): data.
  Dead letter: its own fields, plus a copy of every one of these of the entry.
]]
local RECORD = {
  stream = 's', version = 'v', type = 't', data = 'd', group = 'g', replay_of = 'r',
  payload = 'p', due = 'due',
}
