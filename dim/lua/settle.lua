-- KEYS[1..3] see check.lua, KEYS[4..] claim keys this node holds
-- ARGV[1] context, ARGV[2] node id, ARGV[3] ttl ms (a lease), ARGV[4..] the token this
--   node holds for each claim key, in the same order (ARGV[i] goes with KEYS[i])
-- returns header .. {{1 if the claim got the TTL, else 0, per claim key}}: a create
--   returned, so its claim need outlive only the fence and a disconnect (a lease), not
--   another create (a create lease): each claim still '<node>:<token>' lives a lease
--   from now, not until the next heartbeat renews it; a late request sets nothing
local node, ttl_ms = ARGV[2], tonumber(ARGV[3])
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = {}
  return h
end
local set = {}
for i = 4, #KEYS do
  local flag = 0
  if redis.call('GET', KEYS[i]) == node .. ':' .. ARGV[i] then
    redis.call('PEXPIRE', KEYS[i], ttl_ms)
    flag = 1
  end
  set[#set + 1] = flag
end
local head = header('ok', now)
head[#head + 1] = set
return head
