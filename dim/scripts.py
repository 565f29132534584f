"""The Lua scripts, each headed by its contract.

Every read-then-write dim makes in Redis is one of these scripts, so it is atomic and
checks ownership (claim token, leader epoch) in the same step as the write. Time comes
from the server (``TIME``), never from a client clock.

Numbers: Redis Lua numbers are doubles, exact up to 2**53, and tokens are microseconds
since the epoch (about 2**51), so they are formatted with ``%.0f`` before they become
strings (``tostring`` would switch to exponent notation past 14 digits).
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function now_ms()
  return math.floor(now_us() / 1000)
end
local function num(n)
  return string.format('%.0f', n)
end
-- The fencing counter never goes backwards, even after Redis lost its data: a new
-- value is max(previous + 1, server time in microseconds), and the check below raises
-- it back above every value a node has seen. A script cannot issue values faster than
-- one per microsecond, so the counter never runs ahead of the clock.
local function next_fence(key, now)
  local v = tonumber(redis.call('GET', key) or '0') + 1
  if now > v then v = now end
  redis.call('SET', key, num(v))
  return v
end
local function token_of(value)
  return tonumber(string.match(value or '', ':(%d+)$') or '0')
end
"""

# The check every node script starts with (see dim.era). Its KEYS and ARGV come first:
#   KEYS[1] era (the run id of the server that holds the data), KEYS[2] fence,
#   KEYS[3] reset (open while a reset window lasts: '<why> <server ms>')
#   ARGV[1] the caller's context: '<seen> <est ms> <max delay ms> <jumped> <window ms>'
#     seen: the highest fence value the caller has seen; est: its estimate of the
#     server's time when it sent the request (0: none); max delay: how late after
#     that the request may still run (0: no limit); jumped: '1' if the caller saw the
#     server's clock step forward; window: the reset window to open
# check(now) returns false if the request came too late and must do nothing; else
# true, having opened a reset window if the data was lost or rewound (the fence
# counter is missing or below what the caller has seen, or another server holds it
# now: a restart, a failover) or the server clock stepped. A service never seen before
# on a server up for longer than the window starts at once.
# header(status, now) is the first five fields of every reply: {status, now ms,
# fence, reset window left ms, reset id}.
_CHECK = """
local function server_info()
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then return '', 0 end
  return string.match(info, 'run_id:(%w+)') or '',
         tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0')
end
local function check(now)
  local seen, est, delay, jumped, window =
    string.match(ARGV[1], '^(%d+) (%d+) (%d+) ([01]) (%d+)$')
  if not seen then return true end
  seen, est, delay, window = tonumber(seen), tonumber(est), tonumber(delay), tonumber(window)
  local now_ms = math.floor(now / 1000)
  if est > 0 and delay > 0 and now_ms > est + delay then return false end
  local id, uptime = server_info()
  local era = redis.call('GET', KEYS[1])
  local fence = redis.call('GET', KEYS[2])
  local why = nil
  if not fence then
    -- a new service, or one whose data Redis lost; a claim renewed in the last window
    -- lives in Redis, so on a server up for longer, with a caller that has never seen
    -- this service, nothing can be running: no wait
    if seen > 0 or uptime * 1000 < window then why = 'lost' end
  elseif id ~= '' and era ~= id then why = 'server'
  elseif tonumber(fence) < seen then why = 'rewound'
  elseif jumped == '1' then why = 'clock' end
  if id ~= '' and era ~= id then redis.call('SET', KEYS[1], id) end
  if why then
    local f = tonumber(fence or '0')
    if seen > f then f = seen end
    redis.call('SET', KEYS[2], num(f))
    if redis.call('PTTL', KEYS[3]) < window then
      redis.call('SET', KEYS[3], why .. ' ' .. num(now_ms), 'PX', window)
    end
  end
  return true
end
local function header(status, now)
  local left = redis.call('PTTL', KEYS[3])
  local id = ''
  if left > 0 then id = redis.call('GET', KEYS[3]) else left = 0 end
  return {status, num(math.floor(now / 1000)), redis.call('GET', KEYS[2]) or '0', left, id}
end
"""

HEARTBEAT = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK, KEYS[4] nodes zset, KEYS[5] this node's info hash,
-- KEYS[6] leader, KEYS[7] version, KEYS[8] left zset (tombstones), KEYS[9] failures
-- hash, KEYS[10] control hash, KEYS[11..] claim keys this node holds
-- ARGV[1] context (see _CHECK), ARGV[2] node id, ARGV[3] node ttl ms,
-- ARGV[4] leader ttl ms, ARGV[5] 'member' (renew membership) or 'leaving' (claims only),
-- ARGV[6] '1' if this node may take leadership when nobody holds it,
-- ARGV[7] the leader value this node holds and wants renewed, or '',
-- ARGV[8] '1' to get the membership, failures and controls back (the leader's view, so
--   an idle leader needs no other round trip), ARGV[9] channel, ARGV[10] hint published
--   when this node (re)joins the membership, or '', ARGV[11] this process's session,
-- ARGV[12] the node's instance health ('<running> <unhealthy>'), ARGV[13] its
--   description as a JSON object (stored when the hash is missing),
-- ARGV[14 ..] for each claim key, two values: '<node>:<token>' and the ttl ms to renew
--   it with (a claim whose instance is being created lives longer)
-- returns header .. {outcome, version or nil, leader or nil, acquired 0/1,
--   {claim status per claim key}, {member, expiry ms, ...} or {},
--   {failure field, until ms, ...} or {}, {control field, value, ...} or {}}
--   outcome: 'ok'; 'gone': this node left (a tombstone names this session) and the
--   request changed nothing; 'taken': another process owns the node id (its
--   description, with another session, has not expired) and nothing was changed
--   claim status: 1 renewed, 2 taken back (it was missing, or during a reset window
--   held with a lower token), 0 held by someone else, 3 missing and not taken back
--   (the membership was intact, so the claim was released, not lost)
local now = now_us()
if not check(now) then
  return {'stale', num(math.floor(now / 1000)), redis.call('GET', KEYS[2]) or '0', 0, '',
          'ok', false, false, 0, {}, {}, {}, {}}
end
local head = header('ok', now)
local now_ms = math.floor(now / 1000)
local node = ARGV[2]
local node_ttl = tonumber(ARGV[3])
local function reply(outcome, leader, acquired, statuses, members, failures, control)
  return {head[1], head[2], redis.call('GET', KEYS[2]) or '0', head[4], head[5],
          outcome, redis.call('GET', KEYS[7]), leader, acquired, statuses,
          members, failures, control}
end
local tomb = redis.call('ZSCORE', KEYS[8], node .. ' ' .. ARGV[11])
if tomb and tonumber(tomb) > now_ms then
  return reply('gone', redis.call('GET', KEYS[6]), 0, {}, {}, {}, {})
end
local owner = redis.call('HGET', KEYS[5], 'session')
if owner and owner ~= ARGV[11] then
  return reply('taken', redis.call('GET', KEYS[6]), 0, {}, {}, {}, {})
end
local resetting = head[4] > 0
-- only when Redis lost data (a reset window) or this node's membership lapsed (a frozen
-- process) may a missing claim be taken back: with the membership intact a missing
-- claim was released, and a delayed heartbeat must not bring it back
local score = redis.call('ZSCORE', KEYS[4], node)
local lapsed = (not score) or tonumber(score) <= now_ms
if ARGV[5] == 'member' then
  redis.call('ZADD', KEYS[4], now_ms + node_ttl, node)
  if lapsed and ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
  if not owner then
    for field, value in pairs(cjson.decode(ARGV[13])) do
      redis.call('HSET', KEYS[5], field, value)
      -- a static name is remembered in the control hash, so that any leader (a new one
      -- included) keeps its configs for it while it restarts
      if field == 'static' and value == '1' then
        redis.call('HSET', KEYS[10], 'static ' .. node, '1')
      end
    end
  end
end
if ARGV[12] ~= '' then redis.call('HSET', KEYS[5], 'health', ARGV[12]) end
-- the description (and with it the node id) stays ours while we heartbeat
redis.call('PEXPIRE', KEYS[5], node_ttl)
local statuses = {}
for i = 11, #KEYS do
  local want = ARGV[14 + 2 * (i - 11)]
  local ttl = tonumber(ARGV[15 + 2 * (i - 11)])
  local cur = redis.call('GET', KEYS[i])
  local status = 0
  if cur == want then
    redis.call('PEXPIRE', KEYS[i], ttl)
    status = 1
  elseif (not cur and (resetting or (lapsed and ARGV[5] == 'member')))
      or (cur and resetting and token_of(cur) < token_of(want)) then
    -- Redis lost the claim (or rewound it to an older holder) while this node runs the
    -- instance: nobody else can have taken it since (no new claims during a reset),
    -- so the holder takes it back with its token, and the counter stays above it
    redis.call('SET', KEYS[i], want, 'PX', ttl)
    if tonumber(redis.call('GET', KEYS[2]) or '0') < token_of(want) then
      redis.call('SET', KEYS[2], num(token_of(want)))
    end
    status = 2
  elseif not cur then
    status = 3
  end
  statuses[#statuses + 1] = status
end
local leader = redis.call('GET', KEYS[6])
local acquired = 0
if leader then
  if ARGV[7] ~= '' and leader == ARGV[7] then
    redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[4]))
  end
elseif ARGV[6] == '1' and ARGV[5] == 'member' then
  leader = node .. ':' .. num(next_fence(KEYS[2], now))
  redis.call('SET', KEYS[6], leader, 'PX', tonumber(ARGV[4]))
  acquired = 1
end
local members, failures, control = {}, {}, {}
if ARGV[8] == '1' then
  members = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
  failures = redis.call('HGETALL', KEYS[9])
  control = redis.call('HGETALL', KEYS[10])
end
return reply('ok', leader, acquired, statuses, members, failures, control)
"""
)

CLAIM = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK, KEYS[4] left zset (tombstones), KEYS[5..] claim keys to take
-- ARGV[1] context, ARGV[2] node id, ARGV[3] ttl ms, ARGV[4] this process's session
-- returns header .. {token per claim key}: a fresh token this node now holds, 0 if the
--   claim is held (by another node, or under this node id by an earlier incarnation:
--   a static name's predecessor, a heartbeat run late; it waits for its release or
--   expiry) or this node has left (a delayed request takes nothing), -1 if no claim may
--   be taken now (a reset window, or a late request)
local now = now_us()
local out = {}
if not check(now) then
  for i = 5, #KEYS do out[#out + 1] = -1 end
  local h = header('stale', now)
  h[#h + 1] = out
  return h
end
local head = header('ok', now)
local node = ARGV[2]
local tomb = redis.call('ZSCORE', KEYS[4], node .. ' ' .. ARGV[4])
local refuse = nil
if tomb and tonumber(tomb) > math.floor(now / 1000) then refuse = 0 end
if head[4] > 0 then refuse = -1 end
for i = 5, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if refuse then
    out[#out + 1] = refuse
  elseif not cur then
    local token = next_fence(KEYS[2], now)
    redis.call('SET', KEYS[i], node .. ':' .. num(token), 'PX', tonumber(ARGV[3]))
    out[#out + 1] = token
  else
    out[#out + 1] = 0
  end
end
head[3] = redis.call('GET', KEYS[2]) or '0'
head[#head + 1] = out
return head
"""
)

RETOKEN = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK, KEYS[4] one claim key
-- ARGV[1] context, ARGV[2] node id, ARGV[3] the token this node holds, ARGV[4] ttl ms
-- returns header .. {new token}: an instance recreated in place (unhealthy, or its
--   config changed) is a new incarnation with a new, larger token; 0 if the claim is
--   not '<node>:<token>' any more (lost), -1 for a late request (nothing done)
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = -1
  return h
end
local out = 0
if redis.call('GET', KEYS[4]) == ARGV[2] .. ':' .. ARGV[3] then
  out = next_fence(KEYS[2], now)
  redis.call('SET', KEYS[4], ARGV[2] .. ':' .. num(out), 'PX', tonumber(ARGV[4]))
end
local head = header('ok', now)
head[#head + 1] = out
return head
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

RELEASE = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK, KEYS[4..] claim keys to release
-- ARGV[1] context, ARGV[2] node id, ARGV[3] channel, ARGV[4] hint to publish if anything
-- was released, ARGV[5..] tokens matching KEYS[4..]
-- returns header .. {number of claims deleted}: a claim is deleted only if it still
--   holds exactly '<node>:<token>'; a late request deletes nothing (the claims expire)
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = 0
  return h
end
local n = 0
for i = 4, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2] .. ':' .. ARGV[i + 1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
if n > 0 and ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
local head = header('ok', now)
head[#head + 1] = n
return head
"""
)

LEADER_WRITE = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK, KEYS[4] leader, KEYS[5] assignment, KEYS[6] configs,
-- KEYS[7] version, KEYS[8] nodes, KEYS[9] failures, KEYS[10] control, KEYS[11] unplaced
-- ARGV[1] context, ARGV[2] expected leader value '<node>:<epoch>', ARGV[3] key prefix
-- (for desired sets), ARGV[4] the reset id the plan knows of ('' for none),
-- ARGV[5] JSON change set:
--   {"assign": {ckey: node}, "unassign": [ckey], "configs": {ckey: json},
--    "drop_configs": [ckey], "add": {node: [ckey]}, "rem": {node: [ckey]},
--    "drop_nodes": [node], "drop_failures": [field], "control_set": {field: value},
--    "control_del": [field], "unplaced": {ckey: reason}, "placeable": [ckey]}
-- ARGV[6] channel, ARGV[7] hint prefix: the script appends ',"v":<version>,"p":<prev>}'
-- returns header .. {new version (a fence value, so versions only grow, across resets
--   too) or a refusal: -1 the leader is not ARGV[2], -2 a reset window opened that the
--   plan does not know of (the leader reloads its view), -3 a late request;
--   {nodes in drop_nodes that were alive again and kept}}
-- nothing is written when refused
local now = now_us()
local function refused(code, status)
  local h = header(status, now)
  h[#h + 1] = code
  h[#h + 1] = {}
  return h
end
if not check(now) then return refused(-3, 'stale') end
if redis.call('GET', KEYS[4]) ~= ARGV[2] then return refused(-1, 'ok') end
local reset = redis.call('GET', KEYS[3])
if reset and reset ~= ARGV[4] then return refused(-2, 'ok') end
local now_ms = math.floor(now / 1000)
local change = cjson.decode(ARGV[5])
local prefix = ARGV[3]
for ckey, node in pairs(change['assign'] or {}) do
  redis.call('HSET', KEYS[5], ckey, node)
end
for _, ckey in ipairs(change['unassign'] or {}) do
  redis.call('HDEL', KEYS[5], ckey)
end
for ckey, json in pairs(change['configs'] or {}) do
  redis.call('HSET', KEYS[6], ckey, json)
end
for _, ckey in ipairs(change['drop_configs'] or {}) do
  redis.call('HDEL', KEYS[6], ckey)
end
for node, ckeys in pairs(change['rem'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SREM', prefix .. 'desired:' .. node, ckey) end
end
for node, ckeys in pairs(change['add'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SADD', prefix .. 'desired:' .. node, ckey) end
end
local kept = {}
for _, node in ipairs(change['drop_nodes'] or {}) do
  -- a node that came back since the leader read the members keeps its entry; the
  -- leader is told, and re-plans with it
  local score = redis.call('ZSCORE', KEYS[8], node)
  if (not score) or tonumber(score) <= now_ms then
    redis.call('ZREM', KEYS[8], node)
    redis.call('DEL', prefix .. 'desired:' .. node)
    redis.call('HDEL', KEYS[10], 'drain ' .. node)
  else
    kept[#kept + 1] = node
  end
end
for _, field in ipairs(change['drop_failures'] or {}) do
  redis.call('HDEL', KEYS[9], field)
end
for field, value in pairs(change['control_set'] or {}) do
  redis.call('HSET', KEYS[10], field, value)
end
for _, field in ipairs(change['control_del'] or {}) do
  redis.call('HDEL', KEYS[10], field)
end
for ckey, reason in pairs(change['unplaced'] or {}) do
  redis.call('HSET', KEYS[11], ckey, reason)
end
for _, ckey in ipairs(change['placeable'] or {}) do
  redis.call('HDEL', KEYS[11], ckey)
end
local prev = redis.call('GET', KEYS[7]) or '0'
local version = num(next_fence(KEYS[2], now))
redis.call('SET', KEYS[7], version)
redis.call('PUBLISH', ARGV[6], ARGV[7] .. ',"v":' .. version .. ',"p":' .. prev .. '}')
local head = header('ok', now)
head[#head + 1] = version
head[#head + 1] = kept
return head
"""
)

READ_DESIRED = (
    _PRELUDE
    + _CHECK
    + """
-- KEYS[1..3] see _CHECK (a node reads its share after a restart before anything else:
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
for _, ckey in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if redis.call('HGET', KEYS[7], ckey) == ARGV[2] then
    wanted[ckey] = true
    out[#out + 1] = ckey
    out[#out + 1] = redis.call('HGET', KEYS[5], ckey)
  else
    contested[ckey] = true
  end
end
local mine = {}
for i = 3, #ARGV do
  if not wanted[ARGV[i]] then
    mine[#mine + 1] = ARGV[i]
    mine[#mine + 1] = redis.call('HGET', KEYS[7], ARGV[i])
    mine[#mine + 1] = redis.call('HGET', KEYS[5], ARGV[i])
    mine[#mine + 1] = redis.call('HGET', KEYS[8], ARGV[i])
    mine[#mine + 1] = contested[ARGV[i]] and 1 or 0
  end
end
local head = header('ok', now)
head[#head + 1] = redis.call('GET', KEYS[6])
head[#head + 1] = out
head[#head + 1] = mine
return head
"""
)

LEAVE = """
-- KEYS[1] nodes zset, KEYS[2] the node's info hash, KEYS[3] the node's desired set
-- ARGV[1] node id, ARGV[2] this process's session
-- returns 1 if this node left the membership, 0 if the node id belongs to another
--   process by now (a static name taken over by a successor: its entries stay)
local owner = redis.call('HGET', KEYS[2], 'session')
if owner and owner ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

REPAIR_READ = """
-- KEYS[1] assignment hash, KEYS[2] version
-- ARGV[1] key prefix, ARGV[2] 'count' or 'full', ARGV[3..] node ids
-- returns {version or nil, the assignment: its size ('count') or {ckey, node, ...}
--   ('full'), {node, the size ('count') or members ('full') of its desired set, ...}}:
--   what the leader compares with its own copy (counts first: they cost nothing)
local full = ARGV[2] == 'full'
local sets = {}
for i = 3, #ARGV do
  local key = ARGV[1] .. 'desired:' .. ARGV[i]
  sets[#sets + 1] = ARGV[i]
  if full then
    sets[#sets + 1] = redis.call('SMEMBERS', key)
  else
    sets[#sets + 1] = redis.call('SCARD', key)
  end
end
local assignment
if full then
  assignment = redis.call('HGETALL', KEYS[1])
else
  assignment = redis.call('HLEN', KEYS[1])
end
return {redis.call('GET', KEYS[2]), assignment, sets}
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
