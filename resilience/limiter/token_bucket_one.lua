-- One request against one limit: the common case of token_bucket.lua, kept minimal
-- because it runs on every single decision. Same rules, same stored value.
--
-- KEYS[1]  the bucket
-- ARGV[1]  the request's cost in microseconds of refill (cost x microseconds per token)
-- ARGV[2]  microseconds an empty bucket takes to fill
--
-- Returns w >= 0 when the tokens were taken, or -w - 1 when not, where w is how long
-- (microseconds, rounded up) the bucket needed to be full before this request.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local full_at = tonumber(redis.call('GET', KEYS[1]))
if full_at == nil or full_at < now then
  full_at = now
end
local wait = math.ceil(full_at - now)
local after = full_at + tonumber(ARGV[1])
if after - now > tonumber(ARGV[2]) + 1 then
  return -wait - 1
end
redis.call('SET', KEYS[1], string.format('%.3f', after), 'PX', math.max(1, math.ceil((after - now) / 1000)))
return wait
