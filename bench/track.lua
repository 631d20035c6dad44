-- wrk script: POST /v1/track with a unique messageId per request, 1000 users
-- (TRACK_USERS=N for another count) in 100 accounts.
local counter = 0
local users = tonumber(os.getenv("TRACK_USERS") or "") or 1000
local threads = 0
local run = os.getenv("RUN") or "0"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"userId":"u-%d","event":"Bench Event","messageId":"bench-%s-%d-%d","context":{"groupId":"acct-%d"},"properties":{"category":"Bench","revenue":42.99}}',
    counter % users, run, tid, counter, counter % 100)
  return wrk.format("POST", "/v1/track", {["Content-Type"] = "application/json"}, body)
end
