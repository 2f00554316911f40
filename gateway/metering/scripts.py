"""The Lua scripts: ADMIT (one per request, before the upstream call) and CHARGE (one per request, after).

Both touch the keys of one slot only, the API key's (gateway/metering/layout.py), so the layout runs on
Redis Cluster. CHARGE is atomic and idempotent by charge id: it releases the reservation, books the spend
against the budgets, corrects the token window, adds to the counters, appends the record to the ledger
stream and the workflow, all or nothing, once. A charge delivered twice, or replayed from the spool after
an ambiguous failure, changes nothing the second time.

Redis spends most of a script's time on the script call and on each `redis.call` (measured: about 1 us
per call against 0.3-1 us for the command itself), so both scripts keep the number of calls small: the
key's limits and budget state are fields of its record (one HMGET), reservations are one sorted set whose
members carry their amount (`<charge id>:<micro-dollars>`).

Budget state in the key record: `spent_d` / `spent_d_on` (the day it counts) and `spent_m` / `spent_m_on`;
a charge for a later period resets the pair, one for an earlier period (a request across midnight, a late
replay) is not counted against the current one. `reserved`: the sum of live reservations.
"""

from __future__ import annotations

import hashlib

__all__ = ["ADMIT", "CHARGE", "Script"]


class Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# KEYS: 1 key record, 2 window (this minute), 3 window (previous minute), 4 reservations
# ARGV: 1 sha256, 2 charge id, 3 worst-case micro-dollars, 4 worst-case tokens, 5 now (ms),
#       6 reservation ttl (ms), 7 seconds to the end of the UTC day, 8 seconds to the end of the UTC month,
#       9 the UTC day (YYYYMMDD), 10 the UTC month (YYYYMM)
# Returns {0, tenant, role, flags} | {1} unknown key | {2} revoked | {3, retry_after} requests/min
#         | {4, retry_after} tokens/min | {5, retry_after, 'day'|'month'} budget
# flags: 1 the key has a budget (a reservation was made when the worst case is > 0), 2 a tokens/min limit.
ADMIT = Script("""
local rec = redis.call('HMGET', KEYS[1], 'sha256', 'revoked', 'tenant', 'role', 'rpm', 'tpm', 'budget_day',
                       'budget_month', 'reserved', 'spent_d', 'spent_d_on', 'spent_m', 'spent_m_on')
if not rec[1] or rec[1] ~= ARGV[1] then return {1} end
if rec[2] == '1' then return {2} end
local now = tonumber(ARGV[5])
local worst = tonumber(ARGV[3])
local worst_tokens = tonumber(ARGV[4])
local rpm = tonumber(rec[5]) or 0
local tpm = tonumber(rec[6]) or 0
-- Sliding window over two fixed minutes: the previous minute counts in proportion to its overlap.
local into = (now % 60000) / 60000
local left = 60 * (1 - into)
local function check(limit, c, p)
  if limit <= 0 then return 0 end
  if c >= limit then return math.max(1, math.ceil(left)) end
  if p * (1 - into) + c >= limit then
    return math.max(1, math.ceil(left - 60 * (limit - c) / p))
  end
  return 0
end
if rpm > 0 or tpm > 0 then
  local cur = redis.call('HMGET', KEYS[2], 'req', 'tok')
  local prev = redis.call('HMGET', KEYS[3], 'req', 'tok')
  local ra = check(rpm, tonumber(cur[1]) or 0, tonumber(prev[1]) or 0)
  if ra > 0 then return {3, ra} end
  ra = check(tpm, tonumber(cur[2]) or 0, tonumber(prev[2]) or 0)
  if ra > 0 then return {4, ra} end
end
local bd = tonumber(rec[7]) or 0
local bm = tonumber(rec[8]) or 0
local flags = 0
if bd > 0 or bm > 0 then flags = flags + 1 end
if tpm > 0 then flags = flags + 2 end
local reserve = worst > 0 and (bd > 0 or bm > 0)
if reserve then
  -- Reservations of a process that died mid-request expire: give their money back first.
  local reserved = tonumber(rec[9]) or 0
  local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
  if #expired > 0 then
    local freed = 0
    for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREM', KEYS[4], unpack(expired))
    redis.call('HINCRBY', KEYS[1], 'reserved', -freed)
    reserved = reserved - freed
  end
  local spent_d = (rec[11] == ARGV[9]) and (tonumber(rec[10]) or 0) or 0
  local spent_m = (rec[13] == ARGV[10]) and (tonumber(rec[12]) or 0) or 0
  if bd > 0 and spent_d + reserved + worst > bd then return {5, tonumber(ARGV[7]), 'day'} end
  if bm > 0 and spent_m + reserved + worst > bm then return {5, tonumber(ARGV[8]), 'month'} end
end
if rpm > 0 or tpm > 0 then
  redis.call('HINCRBY', KEYS[2], 'req', 1)
  if worst_tokens > 0 then redis.call('HINCRBY', KEYS[2], 'tok', worst_tokens) end
  redis.call('EXPIRE', KEYS[2], 130)
end
if reserve then
  local ttl = tonumber(ARGV[6])
  -- NX: a retried call (its reply was lost) must not reserve twice.
  if redis.call('ZADD', KEYS[4], 'NX', now + ttl, ARGV[2] .. ':' .. ARGV[3]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'reserved', worst)
  end
  redis.call('PEXPIRE', KEYS[4], 2 * ttl)
end
return {0, rec[3], rec[4], flags}
""")

# KEYS: 1 charge ids seen (day), 2 key record, 3 reservations, 4 the window the request was admitted in,
#       5 day counters, 6 ledger stream, 7 workflow records, 8 the request's index entry
# ARGV: 1 charge id, 2 cost (micro-dollars), 3 token correction (actual - counted at admission),
#       4 ttl of charge ids (s), 5 correct the key's limit state ('1': it has a budget or tokens/min),
#       6 reservation ('<charge id>:<micro-dollars>', '' when none), 7 its amount, 8 day (YYYYMMDD),
#       9 month (YYYYMM), 10 ttl of counters and workflows (s), 11 stream MAXLEN,
#       12 record (JSON; '' when nothing was served: only the key's state is corrected),
#       13 group ('tier<US>backend/model<US>agent<US>workflow', US = \\x1f), 14 has workflow ('1'/'0'),
#       15..20 metric values (req pt ct cost ref est), 21 ttl of the request index (s)
# Counter fields are '<group><US><metric>': one field per combination of tier, model, agent and workflow,
# so a charge is five or six HINCRBY; summaries by any one of them add the combinations up when read.
# Returns 1 applied, 0 applied before.
CHARGE = Script("""
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] == '1' then
  if ARGV[6] ~= '' and redis.call('ZREM', KEYS[3], ARGV[6]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'reserved', -tonumber(ARGV[7]))
  end
  local cost = tonumber(ARGV[2])
  if cost > 0 then
    local on = redis.call('HMGET', KEYS[2], 'spent_d_on', 'spent_m_on')
    if on[1] == ARGV[8] then redis.call('HINCRBY', KEYS[2], 'spent_d', cost)
    elseif not on[1] or on[1] < ARGV[8] then redis.call('HSET', KEYS[2], 'spent_d', cost, 'spent_d_on', ARGV[8]) end
    if on[2] == ARGV[9] then redis.call('HINCRBY', KEYS[2], 'spent_m', cost)
    elseif not on[2] or on[2] < ARGV[9] then redis.call('HSET', KEYS[2], 'spent_m', cost, 'spent_m_on', ARGV[9]) end
  end
  local delta = tonumber(ARGV[3])
  if delta ~= 0 and redis.call('EXISTS', KEYS[4]) == 1 then redis.call('HINCRBY', KEYS[4], 'tok', delta) end
end
if ARGV[12] ~= '' then
  local metrics = {'req', 'pt', 'ct', 'cost', 'ref', 'est'}
  for j = 1, 6 do
    if ARGV[14 + j] ~= '0' then redis.call('HINCRBY', KEYS[5], ARGV[13] .. '\\031' .. metrics[j], ARGV[14 + j]) end
  end
  redis.call('EXPIRE', KEYS[5], ARGV[10])
  local entry = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[11], '*', 'r', ARGV[12])
  redis.call('SET', KEYS[8], entry, 'EX', ARGV[21])
  if ARGV[14] == '1' then
    redis.call('RPUSH', KEYS[7], ARGV[12])
    redis.call('EXPIRE', KEYS[7], ARGV[10])
  end
end
return 1
""")
