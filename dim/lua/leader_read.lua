-- KEYS[1] nodes zset, KEYS[2] failures hash, KEYS[3] control hash
-- ARGV[1] key prefix (for node info hashes)
-- returns {now ms, {member, expiry ms, ...}, {failure field, until ms, ...},
--          {member, weight, static, tags, capacity, ...} for the live members (each
--          field of its description, or nil), {control field, value, ...}}
-- The leader's view in one round trip when a hint says the membership changed.
local nodes_key, failures_key, control_key = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local now = now_ms()
local members = redis.call('ZRANGE', nodes_key, 0, -1, 'WITHSCORES')
local infos = {}
for i = 1, #members, 2 do
  if tonumber(members[i + 1]) > now then
    local info = redis.call('HMGET', prefix .. 'node:' .. members[i],
                            'weight', 'static', 'tags', 'capacity')
    infos[#infos + 1] = members[i]
    for j = 1, 4 do infos[#infos + 1] = info[j] end
  end
end
return {now, members, redis.call('HGETALL', failures_key), infos, redis.call('HGETALL', control_key)}
