-- KEYS[1..3] see check.lua, KEYS[4] assignment hash, KEYS[5..] claim keys to release
-- ARGV[1] context, ARGV[2] node id, ARGV[3] channel (a node's inbox is
-- '<channel>:<node>'), ARGV[4] '1' to announce what was released, ARGV[5 .. 4 + n]
-- tokens matching KEYS[5..], ARGV[5 + n ..] the config keys of those claims
-- returns header .. {number of claims deleted}: a claim is deleted only if it still
--   holds exactly '<node>:<token>'; a late request deletes nothing (the claims expire)
-- A released claim is announced to the node the assignment names for its config, the
-- only node that may be waiting for it (protocol.rst §11); a config assigned to nobody
-- or to this node is announced to nobody.
local assignment_key = KEYS[4]
local node, channel, announce = ARGV[2], ARGV[3], ARGV[4] == '1'
local count = #KEYS - 4
local now = now_us()
if not check(now) then
  local h = header('stale', now)
  h[#h + 1] = 0
  return h
end
local n = 0
local waiting, order = {}, {}
for i = 1, count do
  if redis.call('GET', KEYS[4 + i]) == node .. ':' .. ARGV[4 + i] then
    redis.call('DEL', KEYS[4 + i])
    n = n + 1
    local ckey = ARGV[4 + count + i]
    local to = announce and redis.call('HGET', assignment_key, ckey)
    if to and to ~= node then
      if not waiting[to] then
        waiting[to] = {}
        order[#order + 1] = to
      end
      waiting[to][#waiting[to] + 1] = ckey
    end
  end
end
for _, to in ipairs(order) do
  local hint = cjson.encode({k = 'released', n = node, c = waiting[to]})
  -- too many to name in one hint: the node retries every claim it waits for
  if #hint > 1000 then hint = cjson.encode({k = 'released', n = node}) end
  redis.call('PUBLISH', channel .. ':' .. to, hint)
end
local head = header('ok', now)
head[#head + 1] = n
return head
