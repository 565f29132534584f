-- KEYS[1] failures hash
-- ARGV[1] field '<node> <ckey>', ARGV[2] cool-down ms, ARGV[3] channel, ARGV[4] hint
-- returns the expiry (server ms) recorded for the failure
local failures_key = KEYS[1]
local field, cooldown_ms, channel, hint = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local until_ms = now_ms() + tonumber(cooldown_ms)
redis.call('HSET', failures_key, field, num(until_ms))
redis.call('PUBLISH', channel, hint)
return until_ms
