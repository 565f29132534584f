-- KEYS[1..3] see check.lua, KEYS[4..] claim keys to release
-- ARGV[1] context, ARGV[2] node id, ARGV[3] channel, ARGV[4] hint to publish if anything
-- was released, ARGV[5..] tokens matching KEYS[4..]
-- returns header .. {number of claims deleted}: a claim is deleted only if it still
--   holds exactly '<node>:<token>'; a late request deletes nothing (the claims expire)
local node, channel, hint = ARGV[2], ARGV[3], ARGV[4]
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = 0
  return h
end
local n = 0
for i = 4, #KEYS do
  if redis.call('GET', KEYS[i]) == node .. ':' .. ARGV[i + 1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
if n > 0 and hint ~= '' then redis.call('PUBLISH', channel, hint) end
local head = header('ok', now)
head[#head + 1] = n
return head
