-- KEYS[1] assignment hash, KEYS[2] version
-- ARGV[1] key prefix, ARGV[2] 'count' or 'full', ARGV[3..] node ids
-- returns {version or nil, the assignment: its size ('count') or {ckey, node, ...}
--   ('full'), {node, the size ('count') or members ('full') of its desired set, ...}}:
--   what the leader compares with its own copy (counts first: they cost nothing)
local assignment_key, version_key = KEYS[1], KEYS[2]
local prefix, mode = ARGV[1], ARGV[2]
local full = mode == 'full'
local sets = {}
for i = 3, #ARGV do
  local key = prefix .. 'desired:' .. ARGV[i]
  sets[#sets + 1] = ARGV[i]
  if full then
    sets[#sets + 1] = redis.call('SMEMBERS', key)
  else
    sets[#sets + 1] = redis.call('SCARD', key)
  end
end
local assignment
if full then
  assignment = redis.call('HGETALL', assignment_key)
else
  assignment = redis.call('HLEN', assignment_key)
end
return {redis.call('GET', version_key), assignment, sets}
