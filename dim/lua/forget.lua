-- KEYS[1] left zset (tombstones), KEYS[2] nodes zset, KEYS[3] node info hash,
-- KEYS[4] the node's desired set, KEYS[5] control hash, KEYS[6] assignment hash,
-- KEYS[7] unplaced hash, KEYS[8] leader, KEYS[9] shares hash,
-- KEYS[10] deltas hash
-- ARGV[1] node id, ARGV[2] tombstone ttl ms, ARGV[3] this process's session
-- returns 1; trims expired tombstones, adds this process's, and removes every trace of
--   the node unless another process owns the node id by now (a static name reused).
--   The last node to go, with no leader left to do it, also clears the placement, so
--   only history stays (configs, fence, version, tombstones).
local left_key = KEYS[1]
local nodes_key = KEYS[2]
local info_key = KEYS[3]
local desired_key = KEYS[4]
local control_key = KEYS[5]
local assignment_key = KEYS[6]
local unplaced_key = KEYS[7]
local leader_key = KEYS[8]
local shares_key = KEYS[9]
local deltas_key = KEYS[10]
local node, tombstone_ttl_ms, session = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', left_key, '-inf', now)
redis.call('ZADD', left_key, now + tonumber(tombstone_ttl_ms), node .. ' ' .. session)
local owner = redis.call('HGET', info_key, 'session')
if (not owner) or owner == session then
  redis.call('ZREM', nodes_key, node)
  redis.call('DEL', info_key, desired_key)
  redis.call('HDEL', shares_key, node)
  redis.call('HDEL', deltas_key, node)
  redis.call('HDEL', control_key, 'drain ' .. node)
end
local live = redis.call('ZCOUNT', nodes_key, '(' .. num(now), '+inf')
if live == 0 and redis.call('EXISTS', leader_key) == 0 then
  redis.call('DEL', assignment_key, unplaced_key)
end
return 1
