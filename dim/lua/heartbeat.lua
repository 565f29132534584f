-- KEYS[1..3] see check.lua, KEYS[4] nodes zset, KEYS[5] this node's info hash,
-- KEYS[6] leader, KEYS[7] shares hash, KEYS[8] left zset (tombstones), KEYS[9] failures
-- hash, KEYS[10] control hash, KEYS[11..] claim keys this node holds
-- ARGV[1] context (see check.lua), ARGV[2] node id, ARGV[3] node ttl ms,
-- ARGV[4] leader ttl ms, ARGV[5] 'member' (renew membership) or 'leaving' (claims only),
-- ARGV[6] '1' if this node may take leadership when nobody holds it,
-- ARGV[7] the leader value this node holds and wants renewed, or '',
-- ARGV[8] '1' to get the membership, failures and controls back (the leader's view, so
--   an idle leader needs no other round trip), ARGV[9] channel, ARGV[10] hint published
--   to the leader's inbox ('<channel>:<leader node>') when this node (re)joins the
--   membership, or '', ARGV[11] this process's session,
-- ARGV[12] the node's instance health ('<running> <unhealthy>'), ARGV[13] its
--   description as a JSON object (stored when the hash is missing),
-- ARGV[14 ..] for each claim key, two values: '<node>:<token>' and the ttl ms to renew
--   it with (a claim whose instance is being created lives longer)
-- returns header .. {outcome, share version (of this node's desired set) or nil,
--   leader or nil, acquired 0/1,
--   {claim status per claim key}, {member, expiry ms, ...} or {},
--   {failure field, until ms, ...} or {}, {control field, value, ...} or {}}
--   outcome: 'ok'; 'gone': this node left (a tombstone names this session) and the
--   request changed nothing; 'taken': another process owns the node id (its
--   description, with another session, has not expired) and nothing was changed
--   claim status: 1 renewed, 2 taken back (it was missing, or during a reset window
--   held with a lower token), 0 held by someone else, 3 missing and not taken back
--   (the membership was intact, so the claim was released, not lost)
local nodes_key = KEYS[4]
local info_key = KEYS[5]
local leader_key = KEYS[6]
local shares_key = KEYS[7]
local left_key = KEYS[8]
local failures_key = KEYS[9]
local control_key = KEYS[10]
local node = ARGV[2]
local node_ttl_ms = ARGV[3]
local leader_ttl_ms = ARGV[4]
local mode = ARGV[5]
local may_lead = ARGV[6]
local held_leader = ARGV[7]
local want_view = ARGV[8]
local channel = ARGV[9]
local joined_hint = ARGV[10]
local session = ARGV[11]
local health = ARGV[12]
local description = ARGV[13]
local now = now_us()
if not check(now) then
  return {'stale', num(math.floor(now / 1000)), redis.call('GET', fence_key) or '0', 0, '',
          'ok', false, false, 0, {}, {}, {}, {}}
end
local head = header('ok', now)
local now_ms = math.floor(now / 1000)
local node_ttl = tonumber(node_ttl_ms)
local function reply(outcome, leader, acquired, statuses, members, failures, control)
  return {head[1], head[2], redis.call('GET', fence_key) or '0', head[4], head[5],
          outcome, redis.call('HGET', shares_key, node), leader, acquired, statuses,
          members, failures, control}
end
local tomb = redis.call('ZSCORE', left_key, node .. ' ' .. session)
if tomb and tonumber(tomb) > now_ms then
  return reply('gone', redis.call('GET', leader_key), 0, {}, {}, {}, {})
end
local owner = redis.call('HGET', info_key, 'session')
if owner and owner ~= session then
  return reply('taken', redis.call('GET', leader_key), 0, {}, {}, {}, {})
end
local resetting = head[4] > 0
-- only when Redis lost data (a reset window) or this node's membership lapsed (a frozen
-- process) may a missing claim be taken back: with the membership intact a missing
-- claim was released, and a delayed heartbeat must not bring it back
local score = redis.call('ZSCORE', nodes_key, node)
local lapsed = (not score) or tonumber(score) <= now_ms
if mode == 'member' then
  redis.call('ZADD', nodes_key, now_ms + node_ttl, node)
  if lapsed and joined_hint ~= '' then
    local lead = owner_of(redis.call('GET', leader_key))
    if lead and lead ~= node then redis.call('PUBLISH', channel .. ':' .. lead, joined_hint) end
  end
  if not owner then
    for field, value in pairs(cjson.decode(description)) do
      redis.call('HSET', info_key, field, value)
      -- a static name is remembered in the control hash, so that any leader (a new one
      -- included) keeps its configs for it while it restarts
      if field == 'static' and value == '1' then
        redis.call('HSET', control_key, 'static ' .. node, '1')
      end
    end
  end
end
if health ~= '' then redis.call('HSET', info_key, 'health', health) end
-- the description (and with it the node id) stays ours while we heartbeat
redis.call('PEXPIRE', info_key, node_ttl)
local statuses = {}
for i = 11, #KEYS do
  local want = ARGV[14 + 2 * (i - 11)]
  local ttl = tonumber(ARGV[15 + 2 * (i - 11)])
  local cur = redis.call('GET', KEYS[i])
  local status = 0
  if cur == want then
    redis.call('PEXPIRE', KEYS[i], ttl)
    status = 1
  elseif (not cur and (resetting or (lapsed and mode == 'member')))
      or (cur and resetting and token_of(cur) < token_of(want)) then
    -- Redis lost the claim (or rewound it to an older holder) while this node runs the
    -- instance: nobody else can have taken it since (no new claims during a reset),
    -- so the holder takes it back with its token, and the counter stays above it
    redis.call('SET', KEYS[i], want, 'PX', ttl)
    if tonumber(redis.call('GET', fence_key) or '0') < token_of(want) then
      redis.call('SET', fence_key, num(token_of(want)))
    end
    status = 2
  elseif not cur then
    status = 3
  end
  statuses[#statuses + 1] = status
end
local leader = redis.call('GET', leader_key)
local acquired = 0
if leader then
  if held_leader ~= '' and leader == held_leader then
    redis.call('PEXPIRE', leader_key, tonumber(leader_ttl_ms))
  end
elseif may_lead == '1' and mode == 'member' then
  leader = node .. ':' .. num(next_fence(fence_key, now))
  redis.call('SET', leader_key, leader, 'PX', tonumber(leader_ttl_ms))
  acquired = 1
end
local members, failures, control = {}, {}, {}
if want_view == '1' then
  members = redis.call('ZRANGE', nodes_key, 0, -1, 'WITHSCORES')
  failures = redis.call('HGETALL', failures_key)
  control = redis.call('HGETALL', control_key)
end
return reply('ok', leader, acquired, statuses, members, failures, control)
