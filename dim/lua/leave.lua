-- KEYS[1] nodes zset, KEYS[2] the node's info hash, KEYS[3] the node's desired set
-- ARGV[1] node id, ARGV[2] this process's session
-- returns 1 if this node left the membership, 0 if the node id belongs to another
--   process by now (a static name taken over by a successor: its entries stay)
local nodes_key, info_key, desired_key = KEYS[1], KEYS[2], KEYS[3]
local node, session = ARGV[1], ARGV[2]
local owner = redis.call('HGET', info_key, 'session')
if owner and owner ~= session then return 0 end
redis.call('ZREM', nodes_key, node)
redis.call('DEL', desired_key)
return 1
