-- Token buckets decided atomically on Redis's clock: one call decides one request or a
-- whole batch. The same rules as resilience/limiter/bucket.py, in microseconds.
--
-- ARGV[1]                L, the number of limits each request is checked against;
--                        -L to peek: the same answers, taking nothing and writing no key
-- ARGV[2j], ARGV[2j+1]   limit j: microseconds per token, microseconds to fill (j = 1..L)
-- ARGV[2L+1+i]           the cost of request i (i = 1..n)
-- KEYS[(i-1)L + j]       request i's bucket for limit j; the L keys of a request share
--                        one {hash tag}, so Redis Cluster accepts them
--
-- A bucket's value is the time it is full again (microseconds, Redis clock); it expires
-- then, because a full bucket needs no key. Requests are decided in order, each taking
-- from all its limits or from none.
--
-- Returns one string: per request "ok w1 .. wL", where ok is 1 when the tokens were
-- taken and wj is how long (microseconds, rounded up) limit j's bucket needed to be
-- full before this request. The client derives every other figure from these.

local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local L = tonumber(ARGV[1])
local take = L > 0
if not take then
  L = -L
end
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
    -- One microsecond of slack for float rounding: far below any token interval.
    if full_at + cost * per[j] - now > fill[j] + 1 then
      ok = 0
    end
  end
  out[#out + 1] = ok
  for j = 1, L do
    if take and ok == 1 then
      local after = base[j] + cost * per[j]
      redis.call('SET', KEYS[off + j], string.format('%.3f', after),
                 'PX', math.max(1, math.ceil((after - now) / 1000)))
    end
    out[#out + 1] = math.ceil(base[j] - now)
  end
end
return table.concat(out, ' ')
