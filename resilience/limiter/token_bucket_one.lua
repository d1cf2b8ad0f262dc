-- One request against one limit: the common case of token_bucket.lua, kept minimal
-- because it runs on every single decision. Same rules, same stored value.
--
-- KEYS[1]  the bucket
-- ARGV[1]  the request's cost in microseconds of refill (cost x microseconds per token)
-- ARGV[2]  microseconds an empty bucket takes to fill
--
-- Returns w >= 0 when the tokens were taken, or -w - 1 when not, where w is how long
-- (microseconds, rounded up) the bucket needed to be full before this request.
--
-- Written for Redis's Lua 5.1 interpreter, where every library call costs: strings are
-- coerced by arithmetic instead of tonumber(), and rounding is done with `%`.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local full_at = redis.call('GET', KEYS[1])
if full_at then
  full_at = full_at + 0
  if full_at < now then
    full_at = now
  end
else
  full_at = now
end
local wait = full_at - now
local frac = wait % 1
if frac > 0 then
  wait = wait - frac + 1
end
local after = full_at + ARGV[1]
local ahead = after - now
if ahead > ARGV[2] + 1 then
  return -wait - 1
end
-- Expire when full (rounded up to the next millisecond): a full bucket needs no key.
local px = ahead / 1000
px = px - px % 1 + 1
redis.call('SET', KEYS[1], string.format('%.3f', after), 'PX', px)
return wait
