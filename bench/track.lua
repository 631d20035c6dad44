-- wrk script: POST /v1/track with a unique messageId per request, 1000 users
-- (TRACK_USERS=N for another count) in 100 accounts. MESSAGE_IDS=random gives
-- messageIds in random order, shaped like the UUIDs Segment's libraries send
-- (default: "bench-RUN-THREAD-N", which sort close to each other).
local counter = 0
local users = tonumber(os.getenv("TRACK_USERS") or "") or 1000
local random_ids = os.getenv("MESSAGE_IDS") == "random"
local threads = 0
local run = os.getenv("RUN") or "0"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  math.randomseed(os.time() * 100 + tid)
end

local function message_id()
  if random_ids then
    -- Random hex first; the counter keeps it unique.
    return string.format("%08x-%04x-4%03x-%s-%d-%d", math.random(0, 0x7fffffff),
      math.random(0, 0xffff), math.random(0, 0xfff), run, tid, counter)
  end
  return string.format("bench-%s-%d-%d", run, tid, counter)
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"userId":"u-%d","event":"Bench Event","messageId":"%s","context":{"groupId":"acct-%d"},"properties":{"category":"Bench","revenue":42.99}}',
    counter % users, message_id(), counter % 100)
  return wrk.format("POST", "/v1/track", {["Content-Type"] = "application/json"}, body)
end
