--[[
  The value of `name` in a stream entry's flat field list, or nil.
]]
local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then
      return fields[i + 1]
    end
  end
  return nil
end
