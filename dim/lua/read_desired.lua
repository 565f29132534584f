-- KEYS[1..3] see check.lua (a node reads its share after a restart before anything else:
-- it must learn of a reset before it acts on what it reads), KEYS[4] desired set of one
-- node, KEYS[5] configs hash, KEYS[6] version, KEYS[7] assignment hash, KEYS[8] unplaced
-- hash
-- ARGV[1] context, ARGV[2] node id, ARGV[3..] config keys this node runs or handles now
-- (to learn where they belong)
-- returns header .. {version or nil,
--          {ckey, config json or nil, ...} for the desired set,
--          {ckey, assigned node or nil, config json or nil, unplaced reason or nil,
--           contested 0/1, ...} for the ARGV keys that are not in the desired set}
-- A desired entry that the assignment contradicts (a write lost in a failover, a node
-- that lapsed and came back between the leader's read and write) is left out and
-- reported as contested: a node starts only what both say, stops nothing the two
-- disagree about, and the leader repairs the rest.
local desired_key = KEYS[4]
local configs_key = KEYS[5]
local version_key = KEYS[6]
local assignment_key = KEYS[7]
local unplaced_key = KEYS[8]
local node = ARGV[2]
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = false
  h[#h + 1] = {}
  h[#h + 1] = {}
  return h
end
local out = {}
local wanted = {}
local contested = {}
for _, ckey in ipairs(redis.call('SMEMBERS', desired_key)) do
  if redis.call('HGET', assignment_key, ckey) == node then
    wanted[ckey] = true
    out[#out + 1] = ckey
    out[#out + 1] = redis.call('HGET', configs_key, ckey)
  else
    contested[ckey] = true
  end
end
local mine = {}
for i = 3, #ARGV do
  if not wanted[ARGV[i]] then
    mine[#mine + 1] = ARGV[i]
    mine[#mine + 1] = redis.call('HGET', assignment_key, ARGV[i])
    mine[#mine + 1] = redis.call('HGET', configs_key, ARGV[i])
    mine[#mine + 1] = redis.call('HGET', unplaced_key, ARGV[i])
    mine[#mine + 1] = contested[ARGV[i]] and 1 or 0
  end
end
local head = header('ok', now)
head[#head + 1] = redis.call('GET', version_key)
head[#head + 1] = out
head[#head + 1] = mine
return head
