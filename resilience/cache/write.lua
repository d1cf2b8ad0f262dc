-- A cache write and its invalidation notice, in one round trip.
--
-- KEYS[1]  the value's key
-- ARGV[1]  the value (envelope + serializer payload), or '' to delete it
-- ARGV[2]  its time to live in milliseconds (with a value)
-- ARGV[3]  the channel: {prefix}:invalidate, or on a Redis Cluster the shard channel of
--          KEYS[1]'s own hash slot (so the script touches one slot only)
-- ARGV[4]  the notice
-- ARGV[5]  '1' to publish with SPUBLISH (a shard channel, Redis >= 7), else PUBLISH

if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if ARGV[5] == '1' then
  redis.call('SPUBLISH', ARGV[3], ARGV[4])
else
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
