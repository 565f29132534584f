-- KEYS[1..3] see check.lua, KEYS[4] leader, KEYS[5] assignment, KEYS[6] configs,
-- KEYS[7] version, KEYS[8] nodes, KEYS[9] failures, KEYS[10] control, KEYS[11] unplaced,
-- KEYS[12] shares hash, KEYS[13] deltas hash
-- ARGV[1] context, ARGV[2] expected leader value '<node>:<epoch>', ARGV[3] key prefix
-- (for desired sets), ARGV[4] the reset id the plan knows of ('' for none),
-- ARGV[5] JSON change set:
--   {"assign": {ckey: node}, "unassign": [ckey], "configs": {ckey: json},
--    "drop_configs": [ckey], "add": {node: [ckey]}, "rem": {node: [ckey]},
--    "drop_nodes": [node], "drop_failures": [field], "control_set": {field: value},
--    "control_del": [field], "unplaced": {ckey: reason}, "placeable": [ckey]}
-- ARGV[6] channel, ARGV[7] hint prefix: the script appends ',"v":<version>,"p":<prev>}'
--   and publishes it to the inbox ('<channel>:<node>') of each node of ARGV[8], with
--   <prev> that node's share version before this write
-- ARGV[8] JSON object: for each node whose share this write changes (or that the
--   leader places for the first time), {"a": [ckeys added], "r": [ckeys removed],
--   "u": [ckeys of its share whose config or assignment changed]}: its share version
--   becomes the new version, and its delta ({"p": previous share version, "v": new, ...})
--   is stored for read_desired; "h", when present, is appended to that node's hint
--   (the delta inline: ',"a":{ckey: json},"r":{ckey: node or null}'), followed by
--   ',"c":[ckey]' naming the configs it adds that another node's claim still holds
--   (the node claims those when their release is announced, protocol.rst §4.1)
-- returns header .. {new version (a fence value, so versions only grow, across resets
--   too) or a refusal: -1 the leader is not ARGV[2], -2 a reset window opened that the
--   plan does not know of (the leader reloads its view), -3 a late request;
--   {nodes in drop_nodes that were alive again and kept}}
-- nothing is written when refused
local leader_key = KEYS[4]
local assignment_key = KEYS[5]
local configs_key = KEYS[6]
local version_key = KEYS[7]
local nodes_key = KEYS[8]
local failures_key = KEYS[9]
local control_key = KEYS[10]
local unplaced_key = KEYS[11]
local shares_key = KEYS[12]
local deltas_key = KEYS[13]
local expected_leader = ARGV[2]
local prefix = ARGV[3]
local known_reset = ARGV[4]
local change_json = ARGV[5]
local channel = ARGV[6]
local hint_prefix = ARGV[7]
local targets_json = ARGV[8]
local now = now_us()
local function refused(code, status)
  local h = header(status, now)
  h[#h + 1] = code
  h[#h + 1] = {}
  return h
end
if not check(now) then return refused(-3, 'stale') end
if redis.call('GET', leader_key) ~= expected_leader then return refused(-1, 'ok') end
local reset = redis.call('GET', reset_key)
if reset and reset ~= known_reset then return refused(-2, 'ok') end
local now_ms = math.floor(now / 1000)
local change = cjson.decode(change_json)
for ckey, node in pairs(change['assign'] or {}) do
  redis.call('HSET', assignment_key, ckey, node)
end
for _, ckey in ipairs(change['unassign'] or {}) do
  redis.call('HDEL', assignment_key, ckey)
end
for ckey, json in pairs(change['configs'] or {}) do
  redis.call('HSET', configs_key, ckey, json)
end
for _, ckey in ipairs(change['drop_configs'] or {}) do
  redis.call('HDEL', configs_key, ckey)
end
for node, ckeys in pairs(change['rem'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SREM', prefix .. 'desired:' .. node, ckey) end
end
for node, ckeys in pairs(change['add'] or {}) do
  for _, ckey in ipairs(ckeys) do redis.call('SADD', prefix .. 'desired:' .. node, ckey) end
end
local kept = {}
local dropped = {}
for _, node in ipairs(change['drop_nodes'] or {}) do
  -- a node that came back since the leader read the members keeps its entry; the
  -- leader is told, and re-plans with it
  local score = redis.call('ZSCORE', nodes_key, node)
  if (not score) or tonumber(score) <= now_ms then
    redis.call('ZREM', nodes_key, node)
    redis.call('DEL', prefix .. 'desired:' .. node)
    redis.call('HDEL', shares_key, node)
    redis.call('HDEL', deltas_key, node)
    dropped[node] = true
    redis.call('HDEL', control_key, 'drain ' .. node)
  else
    kept[#kept + 1] = node
  end
end
for _, field in ipairs(change['drop_failures'] or {}) do
  redis.call('HDEL', failures_key, field)
end
for field, value in pairs(change['control_set'] or {}) do
  redis.call('HSET', control_key, field, value)
end
for _, field in ipairs(change['control_del'] or {}) do
  redis.call('HDEL', control_key, field)
end
for ckey, reason in pairs(change['unplaced'] or {}) do
  redis.call('HSET', unplaced_key, ckey, reason)
end
for _, ckey in ipairs(change['placeable'] or {}) do
  redis.call('HDEL', unplaced_key, ckey)
end
local version = num(next_fence(fence_key, now))
redis.call('SET', version_key, version)
-- every share version and delta is written before the first PUBLISH: a publish that
-- fails (a user whose ACL lacks the inboxes) cannot leave a node's share changed
-- without its version, and the heartbeat still tells the node
local hints = {}
for target, d in pairs(cjson.decode(targets_json)) do
  if not dropped[target] then
    local prev = redis.call('HGET', shares_key, target) or ''
    redis.call('HSET', shares_key, target, version)
    redis.call('HSET', deltas_key, target,
      cjson.encode({p = prev, v = version, a = d['a'], r = d['r'], u = d['u']}))
    local held = ''
    if d['h'] then
      -- read in this script, so a release runs after it and finds the new assignee
      local names = {}
      for _, ckey in ipairs(d['a'] or {}) do
        local holder = redis.call('GET', prefix .. 'claim:' .. ckey)
        if holder and string.sub(holder, 1, #target + 1) ~= target .. ':' then
          names[#names + 1] = ckey
        end
      end
      if #names > 0 then held = ',"c":' .. cjson.encode(names) end
    end
    hints[#hints + 1] = {channel .. ':' .. target,
      hint_prefix .. ',"v":' .. version .. ',"p":' .. (prev == '' and '0' or prev)
        .. (d['h'] or '') .. held .. '}'}
  end
end
for _, h in ipairs(hints) do redis.call('PUBLISH', h[1], h[2]) end
local head = header('ok', now)
head[#head + 1] = version
head[#head + 1] = kept
return head
