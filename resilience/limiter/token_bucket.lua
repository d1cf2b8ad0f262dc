-- Token buckets decided atomically, on Redis time.
-- The same rules as resilience/limiter/bucket.py, in microseconds.
--
-- KEYS[i]  the bucket of limit i; every key shares one {hash tag}, so Cluster accepts it
-- ARGV[1]  cost (tokens)
-- ARGV[2i], ARGV[2i+1]  rate (tokens/s) and capacity of limit i
--
-- A bucket's value is the time it is full again (microseconds since the epoch, Redis
-- clock). A full bucket needs no key, so keys expire when their bucket is full.
--
-- Returns {allowed (0/1), then per limit: allowed_i, remaining_i, retry_us_i, reset_us_i}.
-- All limits consume, or none do.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local base, after, fill = {}, {}, {}
local all_allowed = 1

for i = 1, n do
  local rate = tonumber(ARGV[2 * i])
  local capacity = tonumber(ARGV[2 * i + 1])
  local full_at = tonumber(redis.call('GET', KEYS[i]))
  if full_at == nil or full_at < now then
    full_at = now
  end
  base[i] = full_at
  after[i] = full_at + cost * 1000000 / rate
  fill[i] = capacity * 1000000 / rate
  -- One microsecond of slack for float rounding: far below any token interval.
  if after[i] - now > fill[i] + 1 then
    all_allowed = 0
  end
end

local out = {all_allowed}
for i = 1, n do
  local rate = tonumber(ARGV[2 * i])
  local capacity = tonumber(ARGV[2 * i + 1])
  local allowed_i = 1
  if after[i] - now > fill[i] + 1 then
    allowed_i = 0
  end
  local remaining, retry, reset
  if all_allowed == 1 then
    local ttl = after[i] - now
    redis.call('SET', KEYS[i], string.format('%.3f', after[i]), 'PX', math.max(1, math.ceil(ttl / 1000)))
    remaining = capacity - ttl * rate / 1000000
    retry = 0
    reset = ttl
  else
    remaining = capacity - (base[i] - now) * rate / 1000000
    retry = math.max(0, after[i] - now - fill[i])
    reset = base[i] - now
  end
  out[#out + 1] = allowed_i
  out[#out + 1] = math.floor(remaining + 0.000001)
  out[#out + 1] = math.ceil(retry)
  out[#out + 1] = math.ceil(reset)
end
return out
