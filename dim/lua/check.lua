-- The check every node script starts with (see dim/era.py). Its KEYS and ARGV come first:
--   KEYS[1] era (the run id of the Redis server that holds the data), KEYS[2] fence,
--   KEYS[3] reset (open while a reset window lasts: '<why> <server ms>')
--   ARGV[1] the caller's context: '<seen> <est ms> <max delay ms> <jumped> <window ms>'
--     seen: the highest fence value the caller has seen; est: its estimate of the
--     server's time when it sent the request (0: none); max delay: how late after
--     that the request may still run (0: no limit); jumped: '1' if the caller saw the
--     server's clock step forward; window: the reset window to open
-- check(now) returns false if the request came too late and must do nothing; else
-- true, having opened a reset window if the data was lost or rewound (the fence
-- counter is missing or below what the caller has seen, or another server holds it
-- now: a restart, a failover) or the server clock stepped. A service never seen before
-- on a server up for longer than the window starts at once.
-- header(status, now) is the first five fields of every reply: {status, now ms,
-- fence, reset window left ms, reset id}.
local era_key, fence_key, reset_key = KEYS[1], KEYS[2], KEYS[3]
local context = ARGV[1]
local function server_info()
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then return '', 0 end
  return string.match(info, 'run_id:(%w+)') or '',
         tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0')
end
local function check(now)
  local seen, est, delay, jumped, window =
    string.match(context, '^(%d+) (%d+) (%d+) ([01]) (%d+)$')
  if not seen then return true end
  seen, est, delay, window = tonumber(seen), tonumber(est), tonumber(delay), tonumber(window)
  local now_ms = math.floor(now / 1000)
  if est > 0 and delay > 0 and now_ms > est + delay then return false end
  local id, uptime = server_info()
  local era = redis.call('GET', era_key)
  local fence = redis.call('GET', fence_key)
  local why = nil
  if not fence then
    -- a new service, or one whose data Redis lost; a claim renewed in the last window
    -- lives in Redis, so on a server up for longer, with a caller that has never seen
    -- this service, nothing can be running: no wait
    if seen > 0 or uptime * 1000 < window then why = 'lost' end
  elseif id ~= '' and era ~= id then why = 'server'
  elseif tonumber(fence) < seen then why = 'rewound'
  elseif jumped == '1' then why = 'clock' end
  if id ~= '' and era ~= id then redis.call('SET', era_key, id) end
  if why then
    local f = tonumber(fence or '0')
    if seen > f then f = seen end
    redis.call('SET', fence_key, num(f))
    if redis.call('PTTL', reset_key) < window then
      redis.call('SET', reset_key, why .. ' ' .. num(now_ms), 'PX', window)
    end
  end
  return true
end
local function header(status, now)
  local left = redis.call('PTTL', reset_key)
  local id = ''
  if left > 0 then id = redis.call('GET', reset_key) else left = 0 end
  return {status, num(math.floor(now / 1000)), redis.call('GET', fence_key) or '0', left, id}
end
