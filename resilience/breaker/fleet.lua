-- One flush of a RedisFleet member for one breaker: apply this instance's probe verdict,
-- renew its heartbeat and vote, add its outcome counts, decide whether the fleet opens,
-- hand out the probe lease, and return the fleet's state.
--
-- KEYS[1]  the breaker's hash: state (0 closed, 1 open), gen (bumped on every change of
--          the fleet's state), until (ms of Redis TIME when probing may start), trips
--          (consecutive fleet trips, for the recovery backoff), m:<id> (a member:
--          "<expires ms> <gen of its vote, or -1>") and t:<id> (its counts as last added:
--          "<successes> <failures>")
-- KEYS[2]  the fleet's outcome counts by slot: fields s<epoch> and f<epoch>
-- KEYS[3]  the probe lease: the holder's token, with an expiry (SET NX PX)
-- All three share the {name} hash tag, so the script runs on Redis Cluster.
--
-- ARGV[1]  member id          ARGV[2]  heartbeat ttl ms     ARGV[3]  vote: gen or -1
-- ARGV[4]  wants the lease    ARGV[5]  token                ARGV[6]  verdict: '', 's', 'f'
-- ARGV[7]  lease ms           ARGV[8]  quorum (0, 1]        ARGV[9]  recovery ms
-- ARGV[10] recovery backoff   ARGV[11] recovery cap ms or 0 ARGV[12] rate threshold or 0
-- ARGV[13] rate minimum calls ARGV[14] slot width ms        ARGV[15] slots in the window
-- ARGV[16] successes (running total)  ARGV[17] failures (running total)
-- ARGV[18] 1: only set the counts' base (after an outage: old counts are not added)
-- ARGV[19] 1: leave the fleet
--
-- Returns {gen, state, until - now (ms), 1 if this token holds the lease, live members,
-- votes}. Running totals make a flush idempotent: one sent again adds nothing twice.
-- Written for Redis's Lua 5.1: arithmetic coerces strings; %.0f formats integers exactly.

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id = ARGV[1]
local token = ARGV[5]

local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'until', 'trips')
local state = tonumber(f[1]) or 0
local gen = tonumber(f[2]) or 0
local until_ms = tonumber(f[3]) or 0
local trips = tonumber(f[4]) or 0

local function recovery(n)
  local ms = ARGV[9] * (ARGV[10] ^ math.min(n - 1, 64))
  local cap = tonumber(ARGV[11])
  if cap > 0 and ms > cap then
    ms = cap
  end
  return math.floor(ms)
end

local function open(n)
  state = 1
  gen = gen + 1
  trips = n
  until_ms = now + recovery(n)
end

-- The holder's verdict counts only while its token still holds the lease (fencing).
local verdict = ARGV[6]
if verdict ~= '' and state == 1 and redis.call('GET', KEYS[3]) == token then
  redis.call('DEL', KEYS[3])
  if verdict == 's' then
    state = 0
    gen = gen + 1
    trips = 0
    redis.call('DEL', KEYS[2]) -- the outage's failures must not trip the fleet again
  else
    open(trips + 1)
  end
end

-- Membership: this instance's heartbeat, or its leaving.
if ARGV[19] == '1' then
  redis.call('HDEL', KEYS[1], 'm:' .. id, 't:' .. id)
else
  redis.call('HSET', KEYS[1], 'm:' .. id, string.format('%.0f %s', now + ARGV[2], ARGV[3]))
end

-- Outcome counts, for the fleet-wide failure rate.
local threshold = tonumber(ARGV[12])
if threshold > 0 and ARGV[19] ~= '1' then
  local width = ARGV[14] + 0
  local epoch = math.floor(now / width)
  local seen_s, seen_f = 0, 0
  local seen = redis.call('HGET', KEYS[1], 't:' .. id)
  if seen then
    local space = string.find(seen, ' ', 1, true)
    if space then
      seen_s = tonumber(string.sub(seen, 1, space - 1)) or 0
      seen_f = tonumber(string.sub(seen, space + 1)) or 0
    end
  end
  local total_s, total_f = ARGV[16] + 0, ARGV[17] + 0
  if ARGV[18] ~= '1' then
    local slot = string.format('%.0f', epoch)
    if total_s > seen_s then
      redis.call('HINCRBY', KEYS[2], 's' .. slot, total_s - seen_s)
    end
    if total_f > seen_f then
      redis.call('HINCRBY', KEYS[2], 'f' .. slot, total_f - seen_f)
    end
    redis.call('PEXPIRE', KEYS[2], math.floor(width * ARGV[15] * 2))
  end
  redis.call('HSET', KEYS[1], 't:' .. id, string.format('%.0f %.0f', total_s, total_f))
end

-- Live members and their votes; a member whose heartbeat ran out leaves with its vote.
local live, votes = 0, 0
local dead = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == 'm:' then
    local v = fields[i + 1]
    local space = string.find(v, ' ', 1, true)
    local expires = tonumber(string.sub(v, 1, (space or 0) - 1)) or 0
    if expires <= now then
      dead[#dead + 1] = name
      dead[#dead + 1] = 't:' .. string.sub(name, 3)
    else
      live = live + 1
      if space and tonumber(string.sub(v, space + 1)) == gen then
        votes = votes + 1
      end
    end
  end
end
if #dead > 0 then
  redis.call('HDEL', KEYS[1], unpack(dead))
end

if state == 0 then
  local trip = votes > 0 and votes >= ARGV[8] * live
  if not trip and threshold > 0 then
    local oldest = math.floor(now / ARGV[14]) - ARGV[15]
    local calls, failures = 0, 0
    local stale = {}
    local slots = redis.call('HGETALL', KEYS[2])
    for i = 1, #slots, 2 do
      local e = tonumber(string.sub(slots[i], 2))
      if e == nil or e <= oldest then
        stale[#stale + 1] = slots[i]
      else
        local n = slots[i + 1] + 0
        calls = calls + n
        if string.sub(slots[i], 1, 1) == 'f' then
          failures = failures + n
        end
      end
    end
    if #stale > 0 then
      redis.call('HDEL', KEYS[2], unpack(stale))
    end
    trip = calls >= ARGV[13] + 0 and failures >= threshold * calls
  end
  if trip then
    open(1)
  end
end

-- The probe lease: one holder at a time, once the recovery time is up.
local holder = 0
if state == 1 then
  if ARGV[4] == '1' and now >= until_ms then
    redis.call('SET', KEYS[3], token, 'NX', 'PX', ARGV[7])
  end
  if token ~= '' and redis.call('GET', KEYS[3]) == token then
    holder = 1
  end
end

redis.call('HSET', KEYS[1], 'state', state, 'gen', gen, 'until', string.format('%.0f', until_ms),
  'trips', trips)
local keep = ARGV[2] * 3
if state == 1 and until_ms - now + ARGV[2] * 3 > keep then
  keep = until_ms - now + ARGV[2] * 3
end
redis.call('PEXPIRE', KEYS[1], math.floor(keep))
return {gen, state, until_ms - now, holder, live, votes}
