-- KEYS[1..3] see check.lua (a node reads its share after a restart before anything else:
-- it must learn of a reset before it acts on what it reads), KEYS[4] desired set of one
-- node, KEYS[5] configs hash, KEYS[6] shares hash, KEYS[7] assignment hash, KEYS[8]
-- unplaced hash, KEYS[9] deltas hash
-- ARGV[1] context, ARGV[2] node id, ARGV[3] the share version this node holds ('' for
-- none: read it all), ARGV[4..] config keys this node runs or handles now outside its
-- share (to learn where they belong)
-- returns header .. {share version (of this node's desired set) or nil,
--          {ckey, config json or nil, ...},
--          {ckey, assigned node or nil, config json or nil, unplaced reason or nil,
--           contested 0/1, ...} for the ARGV keys and removed keys not in the share,
--          {removed ckey, ...} or false}
-- When the last write to this node's share (its delta, protocol.rst §4) followed the
-- version the node holds, only that delta is read: the second list holds the configs
-- added or changed, the fourth those removed (cost grows with what moved, not with the
-- share). Otherwise (false) the second list is the whole share.
-- A desired entry that the assignment contradicts (a write lost in a failover, a node
-- that lapsed and came back between the leader's read and write) is left out and
-- reported as contested: a node starts only what both say, stops nothing the two
-- disagree about, and the leader repairs the rest.
local desired_key = KEYS[4]
local configs_key = KEYS[5]
local shares_key = KEYS[6]
local assignment_key = KEYS[7]
local unplaced_key = KEYS[8]
local deltas_key = KEYS[9]
local node = ARGV[2]
local held = ARGV[3]
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = false
  h[#h + 1] = {}
  h[#h + 1] = {}
  h[#h + 1] = false
  return h
end
local version = redis.call('HGET', shares_key, node)
local delta = nil
if held ~= '' and version then
  if held == version then
    delta = {}  -- nothing changed: only where the asked configs stand
  else
    local raw = redis.call('HGET', deltas_key, node)
    if raw then
      local d = cjson.decode(raw)
      if d['p'] == held and d['v'] == version then delta = d end
    end
  end
end
local out = {}
local wanted = {}
local contested = {}
local function take(ckey)
  if redis.call('HGET', assignment_key, ckey) == node then
    wanted[ckey] = true
    out[#out + 1] = ckey
    out[#out + 1] = redis.call('HGET', configs_key, ckey)
  else
    contested[ckey] = true
  end
end
local removed = false
local asked = {}
for i = 4, #ARGV do asked[#asked + 1] = ARGV[i] end
if delta then
  -- the delta applies to exactly the share the node holds (no write since: the share
  -- version is the delta's), so what it adds and removes is what the set did
  removed = {}
  for _, ckey in ipairs(delta['a'] or {}) do take(ckey) end
  for _, ckey in ipairs(delta['u'] or {}) do take(ckey) end
  for _, ckey in ipairs(delta['r'] or {}) do
    removed[#removed + 1] = ckey
    asked[#asked + 1] = ckey
  end
  -- an entry the assignment contradicts leaves the node's share, as in a full read
  for ckey in pairs(contested) do
    removed[#removed + 1] = ckey
    asked[#asked + 1] = ckey
  end
else
  for _, ckey in ipairs(redis.call('SMEMBERS', desired_key)) do take(ckey) end
end
if delta then
  -- an asked config our set still names (the assignment elsewhere, found by an
  -- earlier whole read: contested; or back with us) stands as in a whole read
  for _, ckey in ipairs(asked) do
    if not wanted[ckey] and not contested[ckey]
        and redis.call('SISMEMBER', desired_key, ckey) == 1 then
      take(ckey)
    end
  end
end
local mine = {}
local seen = {}
for _, ckey in ipairs(asked) do
  if not wanted[ckey] and not seen[ckey] then
    seen[ckey] = true
    mine[#mine + 1] = ckey
    mine[#mine + 1] = redis.call('HGET', assignment_key, ckey)
    mine[#mine + 1] = redis.call('HGET', configs_key, ckey)
    mine[#mine + 1] = redis.call('HGET', unplaced_key, ckey)
    mine[#mine + 1] = contested[ckey] and 1 or 0
  end
end
local head = header('ok', now)
head[#head + 1] = version
head[#head + 1] = out
head[#head + 1] = mine
head[#head + 1] = removed
return head
