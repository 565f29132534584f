-- KEYS[1..3] see check.lua, KEYS[4] left zset (tombstones), KEYS[5..] claim keys to take
-- ARGV[1] context, ARGV[2] node id, ARGV[3] ttl ms, ARGV[4] this process's session
-- returns header .. {token per claim key}: a fresh token this node now holds, 0 if the
--   claim is held (by another node, or under this node id by an earlier incarnation:
--   a static name's predecessor, a heartbeat run late; it waits for its release or
--   expiry) or this node has left (a delayed request takes nothing), -1 if no claim may
--   be taken now (a reset window, or a late request)
local left_key = KEYS[4]
local node, ttl_ms, session = ARGV[2], ARGV[3], ARGV[4]
local now = now_us()
local out = {}
if not check(now) then
  for i = 5, #KEYS do out[#out + 1] = -1 end
  local h = header('stale', now)
  h[#h + 1] = out
  return h
end
local head = header('ok', now)
local tomb = redis.call('ZSCORE', left_key, node .. ' ' .. session)
local refuse = nil
if tomb and tonumber(tomb) > math.floor(now / 1000) then refuse = 0 end
if head[4] > 0 then refuse = -1 end
for i = 5, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if refuse then
    out[#out + 1] = refuse
  elseif not cur then
    local token = next_fence(fence_key, now)
    redis.call('SET', KEYS[i], node .. ':' .. num(token), 'PX', tonumber(ttl_ms))
    out[#out + 1] = token
  else
    out[#out + 1] = 0
  end
end
head[3] = redis.call('GET', fence_key) or '0'
head[#head + 1] = out
return head
