-- KEYS[1] nodes zset, KEYS[2] the node's info hash, KEYS[3] the node's desired set,
-- KEYS[4] shares hash, KEYS[5] leader, KEYS[6] deltas hash
-- ARGV[1] node id, ARGV[2] this process's session, ARGV[3] channel, ARGV[4] hint for the
-- leader's inbox ('<channel>:<leader node>') and the node's own
-- returns 1 if this node left the membership, 0 if the node id belongs to another
--   process by now (a static name taken over by a successor: its entries stay)
local nodes_key, info_key, desired_key, shares_key, leader_key = KEYS[1], KEYS[2], KEYS[3],
  KEYS[4], KEYS[5]
local deltas_key = KEYS[6]
local node, session, channel, hint = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner = redis.call('HGET', info_key, 'session')
if owner and owner ~= session then return 0 end
redis.call('ZREM', nodes_key, node)
redis.call('DEL', desired_key)
redis.call('HDEL', shares_key, node)
redis.call('HDEL', deltas_key, node)
local lead = string.match(redis.call('GET', leader_key) or '', '^(.*):%d+$')
if lead and lead ~= node then redis.call('PUBLISH', channel .. ':' .. lead, hint) end
-- and to the node itself: its listener, woken, reads no more from now on, so that
-- stop() need not wait out a long read
redis.call('PUBLISH', channel .. ':' .. node, hint)
return 1
