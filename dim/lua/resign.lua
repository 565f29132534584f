-- KEYS[1] leader
-- ARGV[1] the leader value this node holds, ARGV[2] channel, ARGV[3] hint
-- returns 1 if this node held the leadership and gave it up, else 0
local leader_key = KEYS[1]
local held_leader, channel, hint = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', leader_key) == held_leader then
  redis.call('DEL', leader_key)
  redis.call('PUBLISH', channel, hint)
  return 1
end
return 0
