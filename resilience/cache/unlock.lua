-- Release a cross-process load lock if it is still ours, then tell the waiters that the
-- value is there (they read it from Redis).
--
-- KEYS[1]  the lock
-- ARGV[1]  our owner token
-- ARGV[2]  the channel: {prefix}:loaded, or on a Redis Cluster the shard channel of
--          KEYS[1]'s own hash slot
-- ARGV[3]  the notice
-- ARGV[4]  '1' to publish with SPUBLISH (a shard channel, Redis >= 7), else PUBLISH

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if ARGV[4] == '1' then
  redis.call('SPUBLISH', ARGV[2], ARGV[3])
else
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
