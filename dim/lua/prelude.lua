-- Shared helpers, prepended to the scripts that need them (see dim/scripts.py).
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
-- the node of '<node>:<number>' (a claim, the leader key)
local function owner_of(value)
  return string.match(value or '', '^(.*):%d+$')
end
