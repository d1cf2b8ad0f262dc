-- What token_bucket.lua would answer now, taking nothing: the same arguments, the same
-- rules and the same reply, without the SET. It only reads, so a key it does not find
-- stays absent (an absent key is a full bucket).
--
-- ARGV[1]                L, the number of limits each request is checked against
-- ARGV[2j], ARGV[2j+1]   limit j: microseconds per token, microseconds to fill (j = 1..L)
-- ARGV[2L+1+i]           the cost of request i (i = 1..n)
-- KEYS[(i-1)L + j]       request i's bucket for limit j (one {hash tag} per request)
--
-- Returns one string: per request "ok w1 .. wL", where ok is 1 when the tokens would be
-- taken and wj is how long (microseconds, rounded up) limit j's bucket needs to be full.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local L = tonumber(ARGV[1])
local per, fill = {}, {}
for j = 1, L do
  per[j] = tonumber(ARGV[2 * j])
  fill[j] = tonumber(ARGV[2 * j + 1])
end
local n = #ARGV - 1 - 2 * L
local out, base = {}, {}
for i = 1, n do
  local cost = tonumber(ARGV[1 + 2 * L + i])
  local off = (i - 1) * L
  local ok = 1
  for j = 1, L do
    local full_at = redis.call('GET', KEYS[off + j])
    if full_at then
      full_at = full_at + 0
      if full_at < now then
        full_at = now
      end
    else
      full_at = now
    end
    base[j] = full_at
    -- The same microsecond of slack as token_bucket.lua, so the answers agree.
    if full_at + cost * per[j] - now > fill[j] + 1 then
      ok = 0
    end
  end
  out[#out + 1] = ok
  for j = 1, L do
    out[#out + 1] = math.ceil(base[j] - now)
  end
end
return table.concat(out, ' ')
