-- KEYS[1..3] see check.lua, KEYS[4] one claim key
-- ARGV[1] context, ARGV[2] node id, ARGV[3] the token this node holds, ARGV[4] ttl ms
-- returns header .. {new token}: an instance recreated in place (unhealthy, or its
--   config changed) is a new incarnation with a new, larger token; 0 if the claim is
--   not '<node>:<token>' any more (lost), -1 for a late request (nothing done)
local claim_key = KEYS[4]
local node, held_token, ttl_ms = ARGV[2], ARGV[3], ARGV[4]
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = -1
  return h
end
local out = 0
if redis.call('GET', claim_key) == node .. ':' .. held_token then
  out = next_fence(fence_key, now)
  redis.call('SET', claim_key, node .. ':' .. num(out), 'PX', tonumber(ttl_ms))
end
local head = header('ok', now)
head[#head + 1] = out
return head
