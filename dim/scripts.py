"""The Lua scripts, each headed by its contract.

Every read-then-write dim makes in Redis is one of these scripts, so it is atomic and
checks ownership (claim token, leader epoch) in the same step as the write. Time comes
from the server (``TIME``), never from a client clock.

Numbers: Redis Lua numbers are doubles, exact up to 2**53, and tokens are milliseconds
since the epoch (about 2**41), so they are formatted with ``%.0f`` before they become
strings (``tostring`` would switch to exponent notation past 14 digits).
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(n)
  return string.format('%.0f', n)
end
-- The fencing counter never goes backwards, even after Redis lost its data:
-- a new value is max(previous + 1, server time in ms).
local function next_fence(key, now)
  local v = tonumber(redis.call('GET', key) or '0') + 1
  if now > v then v = now end
  redis.call('SET', key, num(v))
  return v
end
"""

HEARTBEAT = (
    _PRELUDE
    + """
-- KEYS[1] nodes zset, KEYS[2] this node's info hash, KEYS[3] leader, KEYS[4] fence,
-- KEYS[5] version, KEYS[6] left zset (tombstones), KEYS[7] failures hash,
-- KEYS[8] control hash, KEYS[9..] claim keys this node holds
-- ARGV[1] node id, ARGV[2] node ttl ms, ARGV[3] leader ttl ms,
-- ARGV[4] 'member' (renew membership) or 'leaving' (renew claims only),
-- ARGV[5] '1' if this node may take leadership when nobody holds it,
-- ARGV[6] the leader value this node holds and wants renewed, or '',
-- ARGV[7] '1' to get the membership, failures and controls back (the leader's view, so an idle
--   leader needs no other round trip), ARGV[8] channel, ARGV[9] hint published when
--   this node (re)joins the membership, or '',
-- ARGV[10] this process's session (a random token per start),
-- ARGV[11] the node's instance health now ('<running> <unhealthy>'), stored in its
--   description for the status views,
-- ARGV[12] n = number of info field/value pairs, ARGV[13 .. 12+2n] the pairs (they
--   include the session),
-- ARGV[13+2n ..] the claim values ('<node>:<token>') matching KEYS[9..]
-- returns {now ms, version or nil, leader value or nil, acquired 0/1,
--          fence was missing 0/1, {claim status per claim key}, gone 0/1,
--          {member, expiry ms, ...} or {}, {failure field, until ms, ...} or {},
--          {control field, value, ...} or {}, taken 0/1}
--   taken: another process holds this node id (its description, with another session,
--   has not expired): nothing was changed
--   claim status: 1 renewed, 2 was missing and was taken back, 0 held by someone else,
--   3 missing and not taken back (the node's membership was intact, so the claim was
--   released, not lost)
-- A node that has left has a tombstone in KEYS[6] ('<node> <session>'): a heartbeat
-- that reaches Redis after that (sent before, delayed by a stalled server) changes
-- nothing. The description hash KEYS[2] names the session that owns the node id; it
-- lives as long as that process heartbeats (member or leaving), so a second process
-- with the same id (a static node name) is refused until the first one is gone.
local now = now_ms()
local node = ARGV[1]
local node_ttl = tonumber(ARGV[2])
local ninfo = tonumber(ARGV[12])
local tomb = redis.call('ZSCORE', KEYS[6], node .. ' ' .. ARGV[10])
if tomb and tonumber(tomb) > now then
  return {now, redis.call('GET', KEYS[5]), redis.call('GET', KEYS[3]), 0, 0, {}, 1, {}, {}, {}, 0}
end
local owner = redis.call('HGET', KEYS[2], 'session')
if owner and owner ~= ARGV[10] then
  return {now, redis.call('GET', KEYS[5]), redis.call('GET', KEYS[3]), 0, 0, {}, 0, {}, {}, {}, 1}
end
-- Redis lost its data, or this node's membership lapsed (a frozen process): only then
-- may a missing claim be taken back. With the membership intact a missing claim was
-- released (a delayed heartbeat must not bring it back).
local score = redis.call('ZSCORE', KEYS[1], node)
local lapsed = (not score) or tonumber(score) <= now
-- read before the claim loop, which may create the counter while taking claims back
local fence_missing = 0
if redis.call('EXISTS', KEYS[4]) == 0 then fence_missing = 1 end
if ARGV[4] == 'member' then
  redis.call('ZADD', KEYS[1], now + node_ttl, node)
  if lapsed and ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[8], ARGV[9]) end
  if ninfo > 0 and not owner then
    for i = 13, 12 + 2 * ninfo, 2 do
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
      -- a static name is remembered in the control hash, so that any leader (a new one
      -- included) keeps its configs for it while it restarts
      if ARGV[i] == 'static' and ARGV[i + 1] == '1' then
        redis.call('HSET', KEYS[8], 'static ' .. node, '1')
      end
    end
  end
end
if ARGV[11] ~= '' then redis.call('HSET', KEYS[2], 'health', ARGV[11]) end
-- the description (and with it the node id) stays ours while we heartbeat
redis.call('PEXPIRE', KEYS[2], node_ttl)
local statuses = {}
local first = 13 + 2 * ninfo
for i = 9, #KEYS do
  local want = ARGV[first + i - 9]
  local cur = redis.call('GET', KEYS[i])
  if cur == want then
    redis.call('PEXPIRE', KEYS[i], node_ttl)
    statuses[#statuses + 1] = 1
  elseif (not cur) and not (lapsed and ARGV[4] == 'member') then
    statuses[#statuses + 1] = 3
  elseif not cur then
    -- Redis lost the claim (restart) or it lapsed with nobody taking it: nobody else
    -- can be running it, so the holder takes it back, keeping its token and making sure
    -- the counter stays ahead of that token.
    redis.call('SET', KEYS[i], want, 'PX', node_ttl)
    local token = tonumber(string.match(want, ':(%d+)$') or '0')
    if tonumber(redis.call('GET', KEYS[4]) or '0') < token then
      redis.call('SET', KEYS[4], num(token))
    end
    statuses[#statuses + 1] = 2
  else
    statuses[#statuses + 1] = 0
  end
end
local leader = redis.call('GET', KEYS[3])
local acquired = 0
if leader then
  if ARGV[6] ~= '' and leader == ARGV[6] then
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[3]))
  end
elseif ARGV[5] == '1' and ARGV[4] == 'member' then
  leader = node .. ':' .. num(next_fence(KEYS[4], now))
  redis.call('SET', KEYS[3], leader, 'PX', tonumber(ARGV[3]))
  acquired = 1
end
local members, failures, control = {}, {}, {}
if ARGV[7] == '1' then
  members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  failures = redis.call('HGETALL', KEYS[7])
  control = redis.call('HGETALL', KEYS[8])
end
return {now, redis.call('GET', KEYS[5]), leader, acquired, fence_missing, statuses, 0,
        members, failures, control, 0}
"""
)

CLAIM = (
    _PRELUDE
    + """
-- KEYS[1] fence, KEYS[2] left zset (tombstones), KEYS[3..] claim keys to take
-- ARGV[1] node id, ARGV[2] ttl ms, ARGV[3] this process's session
-- returns {token per claim key}: the token this node now holds (a fresh one, or its
--   existing one if it already held the claim), or 0 if another node holds it (or this
--   node has left: a delayed request takes nothing)
local now = now_ms()
local node = ARGV[1]
local out = {}
local tomb = redis.call('ZSCORE', KEYS[2], node .. ' ' .. ARGV[3])
if tomb and tonumber(tomb) > now then
  for i = 3, #KEYS do out[#out + 1] = 0 end
  return out
end
for i = 3, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if not cur then
    local token = next_fence(KEYS[1], now)
    redis.call('SET', KEYS[i], node .. ':' .. num(token), 'PX', tonumber(ARGV[2]))
    out[#out + 1] = token
  else
    local owner, token = string.match(cur, '^(.*):(%d+)$')
    if owner == node then
      redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
      out[#out + 1] = tonumber(token)
    else
      out[#out + 1] = 0
    end
  end
end
return out
"""
)

LEADER_READ = (
    _PRELUDE
    + """
-- KEYS[1] nodes zset, KEYS[2] failures hash, KEYS[3] control hash
-- ARGV[1] key prefix (for node info hashes)
-- returns {now ms, {member, expiry ms, ...}, {failure field, until ms, ...},
--          {member, weight, static, tags, capacity, ...} for the live members (each
--          field of its description, or nil), {control field, value, ...}}
-- The leader's view in one round trip when a hint says the membership changed.
local now = now_ms()
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local infos = {}
for i = 1, #members, 2 do
  if tonumber(members[i + 1]) > now then
    local info = redis.call('HMGET', ARGV[1] .. 'node:' .. members[i],
                            'weight', 'static', 'tags', 'capacity')
    infos[#infos + 1] = members[i]
    for j = 1, 4 do infos[#infos + 1] = info[j] end
  end
end
return {now, members, redis.call('HGETALL', KEYS[2]), infos, redis.call('HGETALL', KEYS[3])}
"""
)

RELEASE = """
-- KEYS[1..] claim keys to release
-- ARGV[1] node id, ARGV[2] channel, ARGV[3] hint to publish if anything was released,
-- ARGV[4..] tokens matching KEYS
-- returns the number of claims deleted (a claim is deleted only if it still holds
--   exactly '<node>:<token>')
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] .. ':' .. ARGV[i + 3] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
if n > 0 and ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return n
"""

LEADER_WRITE = (
    _PRELUDE
    + """
-- KEYS[1] leader, KEYS[2] assignment, KEYS[3] configs, KEYS[4] version, KEYS[5] nodes,
-- KEYS[6] failures, KEYS[7] control, KEYS[8] unplaced
-- ARGV[1] expected leader value '<node>:<epoch>', ARGV[2] key prefix (for desired sets),
-- ARGV[3] JSON change set:
--   {"assign": {ckey: node}, "unassign": [ckey], "configs": {ckey: json},
--    "drop_configs": [ckey], "add": {node: [ckey]}, "rem": {node: [ckey]},
--    "drop_nodes": [node], "drop_failures": [field], "forget_static": [node],
--    "unplaced": {ckey: reason}, "placeable": [ckey]}
-- ARGV[4] channel, ARGV[5] hint prefix: the script appends ',"v":<version>}'
-- returns the new version, or -1 (and writes nothing) if the leader is not ARGV[1]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local now = now_ms()
local change = cjson.decode(ARGV[3])
local prefix = ARGV[2]
for ckey, node in pairs(change['assign'] or {}) do
  redis.call('HSET', KEYS[2], ckey, node)
end
for _, ckey in ipairs(change['unassign'] or {}) do
  redis.call('HDEL', KEYS[2], ckey)
end
for ckey, json in pairs(change['configs'] or {}) do
  redis.call('HSET', KEYS[3], ckey, json)
end
for _, ckey in ipairs(change['drop_configs'] or {}) do
  redis.call('HDEL', KEYS[3], ckey)
end
for node, ckeys in pairs(change['rem'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SREM', prefix .. 'desired:' .. node, ckey) end
end
for node, ckeys in pairs(change['add'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SADD', prefix .. 'desired:' .. node, ckey) end
end
for _, node in ipairs(change['drop_nodes'] or {}) do
  -- a node that came back since the leader read the members keeps its entry
  local score = redis.call('ZSCORE', KEYS[5], node)
  if (not score) or tonumber(score) <= now then
    redis.call('ZREM', KEYS[5], node)
    redis.call('DEL', prefix .. 'desired:' .. node)
    redis.call('HDEL', KEYS[7], 'drain ' .. node)
  end
end
for _, field in ipairs(change['drop_failures'] or {}) do
  redis.call('HDEL', KEYS[6], field)
end
for _, node in ipairs(change['forget_static'] or {}) do
  redis.call('HDEL', KEYS[7], 'static ' .. node)
end
for ckey, reason in pairs(change['unplaced'] or {}) do
  redis.call('HSET', KEYS[8], ckey, reason)
end
for _, ckey in ipairs(change['placeable'] or {}) do
  redis.call('HDEL', KEYS[8], ckey)
end
local version = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ',"v":' .. version .. '}')
return version
"""
)

READ_DESIRED = """
-- KEYS[1] desired set of one node, KEYS[2] configs hash, KEYS[3] version,
-- KEYS[4] assignment hash, KEYS[5] unplaced hash
-- ARGV[1..] config keys this node runs or handles now (to learn where they belong)
-- returns {version or nil,
--          {ckey, config json or nil, ...} for the desired set,
--          {ckey, assigned node or nil, config json or nil, unplaced reason or nil, ...}
--          for the ARGV keys that are not in the desired set}
local out = {}
local wanted = {}
for _, ckey in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  wanted[ckey] = true
  out[#out + 1] = ckey
  out[#out + 1] = redis.call('HGET', KEYS[2], ckey)
end
local mine = {}
for i = 1, #ARGV do
  if not wanted[ARGV[i]] then
    mine[#mine + 1] = ARGV[i]
    mine[#mine + 1] = redis.call('HGET', KEYS[4], ARGV[i])
    mine[#mine + 1] = redis.call('HGET', KEYS[2], ARGV[i])
    mine[#mine + 1] = redis.call('HGET', KEYS[5], ARGV[i])
  end
end
return {redis.call('GET', KEYS[3]), out, mine}
"""

RESIGN = """
-- KEYS[1] leader
-- ARGV[1] the leader value this node holds, ARGV[2] channel, ARGV[3] hint
-- returns 1 if this node held the leadership and gave it up, else 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

REPORT_FAILURE = (
    _PRELUDE
    + """
-- KEYS[1] failures hash
-- ARGV[1] field '<node> <ckey>', ARGV[2] cool-down ms, ARGV[3] channel, ARGV[4] hint
-- returns the expiry (server ms) recorded for the failure
local until_ms = now_ms() + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], num(until_ms))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return until_ms
"""
)

FORGET = (
    _PRELUDE
    + """
-- KEYS[1] left zset (tombstones), KEYS[2] nodes zset, KEYS[3] node info hash,
-- KEYS[4] the node's desired set, KEYS[5] control hash, KEYS[6] assignment hash,
-- KEYS[7] unplaced hash, KEYS[8] leader
-- ARGV[1] node id, ARGV[2] tombstone ttl ms, ARGV[3] this process's session
-- returns 1; trims expired tombstones, adds this process's, and removes every trace of
--   the node unless another process owns the node id by now (a static name reused).
--   The last node to go, with no leader left to do it, also clears the placement, so
--   only history stays (configs, fence, version, tombstones).
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1] .. ' ' .. ARGV[3])
local owner = redis.call('HGET', KEYS[3], 'session')
if (not owner) or owner == ARGV[3] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('HDEL', KEYS[5], 'drain ' .. ARGV[1])
end
local live = redis.call('ZCOUNT', KEYS[2], '(' .. num(now), '+inf')
if live == 0 and redis.call('EXISTS', KEYS[8]) == 0 then
  redis.call('DEL', KEYS[6], KEYS[7])
end
return 1
"""
)
