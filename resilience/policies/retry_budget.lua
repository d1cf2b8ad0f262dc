-- One sync of a FleetRetryBudget: add what this instance counted since Redis last heard
-- from it to the current slot, drop the slots that left the window, and return the
-- fleet's totals over the window.
--
-- KEYS[1]  the budget's hash: fields d<epoch> (deposits) and w<epoch> (withdrawals),
--          where epoch = floor(Redis TIME / slot width), so hosts' clocks do not matter
-- KEYS[2]  this instance's key: "<deposits> <withdrawals>", its running totals as
--          last added (same hash tag as KEYS[1])
-- ARGV[1]  the slot width in microseconds (window / slots)
-- ARGV[2]  slots in the window
-- ARGV[3]  the instance's running total of deposits
-- ARGV[4]  that total less its deposits still in the window: older ones are not added
-- ARGV[5]  the instance's running total of withdrawals
-- ARGV[6]  that total less its withdrawals still in the window
-- ARGV[7]  both keys' expiry in milliseconds (about two windows), renewed on each write
--
-- Running totals make a sync idempotent: one sent again after a lost reply, or one that
-- arrives late, adds nothing twice.
--
-- Returns {deposits, withdrawals} of the slots epoch - slots + 1 .. epoch: the same window
-- as the in-memory BudgetWindow. A slot of a later epoch (a failover to a server whose
-- clock is behind) counts too: it is recent, not stale.
--
-- Written for Redis's Lua 5.1 interpreter: arithmetic coerces strings, and numbers are
-- formatted with %.0f, exact for every integer a double holds.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local epoch = now / ARGV[1]
epoch = epoch - epoch % 1
local slot = string.format('%.0f', epoch)

local seen_d, seen_w = 0, 0
local seen = redis.call('GET', KEYS[2])
if seen then
  local space = string.find(seen, ' ', 1, true)
  if space then
    seen_d = tonumber(string.sub(seen, 1, space - 1)) or 0
    seen_w = tonumber(string.sub(seen, space + 1)) or 0
  end
end
local total_d, total_w = ARGV[3] + 0, ARGV[5] + 0
local base_d, base_w = ARGV[4] + 0, ARGV[6] + 0
if seen_d > base_d then
  base_d = seen_d
end
if seen_w > base_w then
  base_w = seen_w
end
local add_d, add_w = total_d - base_d, total_w - base_w
if add_d > 0 then
  redis.call('HINCRBY', KEYS[1], 'd' .. slot, add_d)
end
if add_w > 0 then
  redis.call('HINCRBY', KEYS[1], 'w' .. slot, add_w)
end
if add_d > 0 or add_w > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  if total_d < seen_d then
    total_d = seen_d
  end
  if total_w < seen_w then
    total_w = seen_w
  end
  redis.call('SET', KEYS[2], string.format('%.0f %.0f', total_d, total_w), 'PX', ARGV[7])
end

local oldest = epoch - ARGV[2]
local deposits, withdrawals = 0, 0
local stale = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local name = fields[i]
  local kind = string.sub(name, 1, 1)
  local e = tonumber(string.sub(name, 2))
  if e == nil or (kind ~= 'd' and kind ~= 'w') then
    stale[#stale + 1] = name -- not a field of ours
  elseif e <= oldest then
    stale[#stale + 1] = name -- left the window
  elseif kind == 'd' then
    deposits = deposits + fields[i + 1]
  else
    withdrawals = withdrawals + fields[i + 1]
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end
return {deposits, withdrawals}
