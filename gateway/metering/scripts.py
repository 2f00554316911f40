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
import struct

__all__ = ["ADMIT", "CHARGE", "CHARGE_FIELDS", "Script"]


class Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# ADMIT decides a batch of admissions of one API key in one rate window (one script call for all the
# admissions of that key that go out in one write), one after the other, each against the state the ones
# before it left: the same answers as one call per admission, with the reads and writes done once.
# KEYS: 1 key record, 2 window (this minute), 3 window (previous minute), 4 reservations
# ARGV: 1 reservation ttl (ms), 2 end of the UTC day (epoch s), 3 end of the UTC month (epoch s),
#       4 the UTC day (YYYYMMDD), 5 the UTC month (YYYYMM); then per admission i (base a = 5 + 6 * (i - 1)):
#       a+1 sha256, a+2 charge id (a lease id when a+6 > 1), a+3 worst-case micro-dollars, a+4 worst-case
#       tokens, a+5 now (ms), a+6 how many such requests to admit at most (1: this request; more: a lease,
#       gateway/metering/lease.py; negative: a lease asked for ahead of need, granted whole or not at all)
# Returns per admission: {0, tenant, role, flags, granted} | {1} unknown key | {2} revoked | {3, retry_after}
#         requests/min | {4, retry_after} tokens/min | {5, retry_after, 'day'|'month', held} budget (held 1:
#         the spend leaves room, reservations are in the way; retry_after 1) | {6} no lease
#         (a lease asked for ahead of need that would be smaller than 8)
# flags: 1 the key has a budget (a reservation was made when the worst case is > 0), 2 a tokens/min limit,
#        4 a requests/min limit.
# granted: how many requests were admitted (1 unless a lease was asked for). A lease is decided like one
# request (the first of them must pass every check); then it is cut to at most half of what is left of each
# limit (requests/min, tokens/min at the worst case, budget at the worst case), so a busy process cannot
# take all of a key's headroom; a lease smaller than 8 is not worth holding: just the one request then. Its requests and tokens are counted in the window and its
# worst case (granted times the request's) reserved as one member `<lease id>:<amount>`.
ADMIT = Script("""
local rec = redis.call('HMGET', KEYS[1], 'sha256', 'revoked', 'tenant', 'role', 'rpm', 'tpm', 'budget_day',
                       'budget_month', 'reserved', 'spent_d', 'spent_d_on', 'spent_m', 'spent_m_on')
local n = (#ARGV - 5) / 6
local out = {}
local rpm = tonumber(rec[5]) or 0
local tpm = tonumber(rec[6]) or 0
local bd = tonumber(rec[7]) or 0
local bm = tonumber(rec[8]) or 0
local budget = bd > 0 or bm > 0
local limited = rpm > 0 or tpm > 0
local flags = 0
if budget then flags = flags + 1 end
if tpm > 0 then flags = flags + 2 end
if rpm > 0 then flags = flags + 4 end
local ttl = tonumber(ARGV[1])
local reserved = tonumber(rec[9]) or 0
local spent_d = (rec[11] == ARGV[4]) and (tonumber(rec[10]) or 0) or 0
local spent_m = (rec[13] == ARGV[5]) and (tonumber(rec[12]) or 0) or 0
local win = nil  -- {this minute's req, tok, the previous minute's req, tok}, read at the first need
local add_req, add_tok = 0, 0
local swept = false
local resv, resv_amount, resv_score = {}, {}, {}
-- Sliding window over two fixed minutes: the previous minute counts in proportion to its overlap.
local function check(limit, c, p, into, left)
  if limit <= 0 then return 0 end
  if c >= limit then return math.max(1, math.ceil(left)) end
  if p * (1 - into) + c >= limit then
    return math.max(1, math.ceil(left - 60 * (limit - c) / p))
  end
  return 0
end
for i = 1, n do
  local a = 5 + 6 * (i - 1)
  if not rec[1] or rec[1] ~= ARGV[a + 1] then out[i] = {1}
  elseif rec[2] == '1' then out[i] = {2}
  else
    local now = tonumber(ARGV[a + 5])
    local worst = tonumber(ARGV[a + 3])
    local worst_tokens = tonumber(ARGV[a + 4])
    local refused = nil
    local into = (now % 60000) / 60000
    if limited then
      if not win then
        local cur = redis.call('HMGET', KEYS[2], 'req', 'tok')
        local prev = redis.call('HMGET', KEYS[3], 'req', 'tok')
        win = {tonumber(cur[1]) or 0, tonumber(cur[2]) or 0, tonumber(prev[1]) or 0, tonumber(prev[2]) or 0}
      end
      local left = 60 * (1 - into)
      local ra = check(rpm, win[1], win[3], into, left)
      if ra > 0 then refused = {3, ra}
      else
        ra = check(tpm, win[2], win[4], into, left)
        if ra > 0 then refused = {4, ra} end
      end
    end
    local reserve = worst > 0 and budget
    if not refused and reserve then
      if not swept then
        -- Reservations of a process that died mid-request expire: give their money back first.
        swept = true
        local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
        if #expired > 0 then
          local freed = 0
          for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
          redis.call('ZREM', KEYS[4], unpack(expired))
          redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -freed))
          reserved = reserved - freed
        end
      end
      local now_s = math.floor(now / 1000)
      -- Retry-After: the end of the period when the spend alone leaves no room; a second when what is in the
      -- way is reservations (requests in flight, leases), which are released within seconds.
      if bd > 0 and spent_d + reserved + worst > bd then
        if spent_d + worst <= bd then refused = {5, 1, 'day', 1} else refused = {5, tonumber(ARGV[2]) - now_s, 'day', 0} end
      elseif bm > 0 and spent_m + reserved + worst > bm then
        if spent_m + worst <= bm then refused = {5, 1, 'month', 1} else refused = {5, tonumber(ARGV[3]) - now_s, 'month', 0} end
      end
    end
    if refused then out[i] = refused
    else
      local g = tonumber(ARGV[a + 6])
      local background = g < 0  -- a lease asked for ahead of need: all of one or none
      if background then g = -g end
      if g > 1 then
        if rpm > 0 then g = math.min(g, math.floor((rpm - win[1] - win[3] * (1 - into)) / 2)) end
        if tpm > 0 and worst_tokens > 0 then
          g = math.min(g, math.floor((tpm - win[2] - win[4] * (1 - into)) / 2 / worst_tokens))
        end
        if reserve then
          if bd > 0 then g = math.min(g, math.floor((bd - spent_d - reserved) / 2 / worst)) end
          if bm > 0 then g = math.min(g, math.floor((bm - spent_m - reserved) / 2 / worst)) end
        end
        if g < 8 then g = 1 end  -- a lease is 8 requests or more; below that, each request is decided alone
      end
      if background and g < 2 then out[i] = {6}
      else
        if limited then
          win[1] = win[1] + g
          add_req = add_req + g
          if worst_tokens > 0 then win[2] = win[2] + g * worst_tokens; add_tok = add_tok + g * worst_tokens end
        end
        if reserve then
          resv[#resv + 1] = ARGV[a + 2] .. ':' .. string.format('%d', g * worst)
          resv_amount[#resv] = g * worst
          resv_score[#resv] = string.format('%d', now + ttl)
          reserved = reserved + g * worst
        end
        out[i] = {0, rec[3], rec[4], flags, g}
      end
    end
  end
end
if add_req > 0 then
  redis.call('HINCRBY', KEYS[2], 'req', string.format('%d', add_req))
  if add_tok > 0 then redis.call('HINCRBY', KEYS[2], 'tok', string.format('%d', add_tok)) end
  redis.call('EXPIRE', KEYS[2], 130)
end
if #resv > 0 then
  -- A retried call (its reply was lost) must not reserve twice: only members not held yet count.
  local held = redis.call('ZMSCORE', KEYS[4], unpack(resv))
  local args, total = {}, 0
  for i, m in ipairs(resv) do
    if not held[i] then
      args[#args + 1] = resv_score[i]
      args[#args + 1] = m
      total = total + resv_amount[i]
    end
  end
  if #args > 0 then
    redis.call('ZADD', KEYS[4], 'NX', unpack(args))
    redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', total))
  end
  redis.call('PEXPIRE', KEYS[4], 2 * ttl)
end
return out
""")

# CHARGE books a batch of charges of one API key (one script call for all the charges of that key that go
# out in one write): most of the work is then done once per batch, not once per charge.
# KEYS: 1 key record, 2 reservations, 3 ledger stream; then the other keys the batch touches, each once
#       (charge ids seen per day, rate windows, daily counters, workflow lists, request index entries).
# ARGV: 1 ttl of charge ids (s), 2 ttl of counters and workflows (s), 3 stream MAXLEN, 4 ttl of the request
#       index (s); then per charge i two arguments (base a = 4 + 2 * (i - 1)):
#       a+1 its fields: 16 numbers packed little-endian (`CHARGE_FIELDS`, Lua's `struct`: no parsing of
#           digits), then 'charge id,request id,group' (the group last: it may hold commas; the ids hold none,
#           gateway/serving.py). The numbers: cost (micro-dollars), token correction (actual - counted at
#           admission), request correction (requests a lease counted and did not use, <= 0), correct the
#           key's limit state (1: it has a budget or a rate limit), reservation amount (released as the
#           member '<charge id>:<amount>'; 0: none), day (YYYYMMDD), month (YYYYMM), then KEYS positions of
#           its charge-id set, rate window, counters, workflow list (0: no workflow), the day's request
#           index, then prompt tokens, completion tokens, reference cost, estimated (1/0). The group is
#           'tier<US>backend/model<US>agent<US>workflow', US = \\x1f
#       a+2 the record (JSON; '' when nothing was served: only the key's state is corrected)
# Counter fields are '<group><US><metric>' (metrics req pt ct cost ref est): one field per combination of
# tier, model, agent and workflow; summaries by any one of them add the combinations up when read. Charges
# of one batch with the same group are added up first: one HINCRBY per field and batch. The request index
# of a day is one hash (request id -> stream entry id): one HSET per day and batch.
# Each charge is applied once (its id not yet in its day's set decides: one SMISMEMBER and one SADD per
# set and batch) and in order; the script is atomic as a whole.
# Returns, per charge: 1 applied, 0 applied before.
CHARGE_FIELDS = struct.Struct("<qqqBqIIHHHHHqqqB")  # what Lua's struct.unpack reads as '<i8i8i8Bi8I4I4HHHHHi8i8i8B'
CHARGE = Script("""
local n = (#ARGV - 4) / 2
local out = {}
local metrics = {'req', 'pt', 'ct', 'cost', 'ref', 'est'}
local items = {}
-- The ids not applied yet: one SMISMEMBER per charge-id set (a day), then one SADD of the new ones.
local by_set, set_keys = {}, {}
for i = 1, n do
  local s = ARGV[4 + 2 * i - 1]
  local f = {0, struct.unpack('<i8i8i8Bi8I4I4HHHHHi8i8i8B', s)}  -- f[2..17]; f[18]: where the text starts
  f[1], f[18], f[19] = string.match(s, '^([^,]*),([^,]*),(.*)$', f[18])
  items[i] = f
  local d = KEYS[f[9]]
  if not by_set[d] then by_set[d] = {}; set_keys[#set_keys + 1] = d end
  local l = by_set[d]
  l[#l + 1] = i
end
local fresh = {}
for _, d in ipairs(set_keys) do
  local idx = by_set[d]
  local ids = {}
  for j, i in ipairs(idx) do ids[j] = items[i][1] end
  local seen = redis.call('SMISMEMBER', d, unpack(ids))
  local add, taken = {}, {}
  for j, i in ipairs(idx) do
    local id = ids[j]
    if seen[j] == 0 and not taken[id] then
      taken[id] = true
      fresh[i] = true
      add[#add + 1] = id
    end
  end
  if #add > 0 then
    redis.call('SADD', d, unpack(add))
    redis.call('EXPIRE', d, ARGV[1])
  end
end
local resv, resv_amount = {}, {}
local state = nil  -- spent_d, spent_d_on, spent_m, spent_m_on, read once when a cost is booked
local windows, window_keys = {}, {}
local counters, counter_keys = {}, {}  -- counters key -> {group -> its six sums, groups in order}
local workflows, workflow_keys = {}, {}
local index, index_keys = {}, {}  -- request index hash -> {request id, entry id, ...}
for i = 1, n do
  local f = items[i]
  if not fresh[i] then
    out[i] = 0
  else
    out[i] = 1
    local cost = f[2]
    if f[5] == 1 then
      local amount = f[6]
      if amount > 0 then
        resv[#resv + 1] = f[1] .. ':' .. string.format('%d', amount)
        resv_amount[#resv] = amount
      end
      if cost > 0 then
        if not state then
          local r = redis.call('HMGET', KEYS[1], 'spent_d', 'spent_d_on', 'spent_m', 'spent_m_on')
          state = {tonumber(r[1]) or 0, tonumber(r[2]), tonumber(r[3]) or 0, tonumber(r[4]), false}
        end
        local day, month = f[7], f[8]
        if state[2] == day then state[1] = state[1] + cost; state[5] = true
        elseif not state[2] or state[2] < day then state[1] = cost; state[2] = day; state[5] = true end
        if state[4] == month then state[3] = state[3] + cost; state[5] = true
        elseif not state[4] or state[4] < month then state[3] = cost; state[4] = month; state[5] = true end
      end
      local delta, rdelta = f[3], f[4]
      if delta ~= 0 or rdelta ~= 0 then
        local w = KEYS[f[10]]
        if not windows[w] then windows[w] = {0, 0}; window_keys[#window_keys + 1] = w end
        windows[w][1] = windows[w][1] + delta
        windows[w][2] = windows[w][2] + rdelta
      end
    end
    local record = ARGV[4 + 2 * i]
    if record ~= '' then
      local ck = KEYS[f[11]]
      local c = counters[ck]
      if not c then c = {{}, {}}; counters[ck] = c; counter_keys[#counter_keys + 1] = ck end
      local group = f[19]
      local sums = c[1][group]
      if not sums then sums = {0, 0, 0, 0, 0, 0}; c[1][group] = sums; c[2][#c[2] + 1] = group end
      sums[1] = sums[1] + 1
      sums[2] = sums[2] + f[14]
      sums[3] = sums[3] + f[15]
      sums[4] = sums[4] + cost
      sums[5] = sums[5] + f[16]
      sums[6] = sums[6] + f[17]
      local entry = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'r', record)
      local rk = KEYS[f[13]]
      local rl = index[rk]
      if not rl then rl = {}; index[rk] = rl; index_keys[#index_keys + 1] = rk end
      rl[#rl + 1] = f[18]
      rl[#rl + 1] = entry
      local wi = f[12]
      if wi > 0 then
        local wk = KEYS[wi]
        if not workflows[wk] then workflows[wk] = {}; workflow_keys[#workflow_keys + 1] = wk end
        local l = workflows[wk]
        l[#l + 1] = record
      end
    end
  end
end
if #resv > 0 then
  -- Release only the reservations still held (a reservation that expired was given back by ADMIT).
  local held = redis.call('ZMSCORE', KEYS[2], unpack(resv))
  local gone, freed = {}, 0
  for i, s in ipairs(resv) do
    if held[i] then gone[#gone + 1] = s; freed = freed + resv_amount[i] end
  end
  if #gone > 0 then
    redis.call('ZREM', KEYS[2], unpack(gone))
    redis.call('HINCRBY', KEYS[1], 'reserved', string.format('%d', -freed))
  end
end
if state and state[5] then
  redis.call('HSET', KEYS[1], 'spent_d', string.format('%d', state[1]), 'spent_d_on', string.format('%d', state[2]),
             'spent_m', string.format('%d', state[3]), 'spent_m_on', string.format('%d', state[4]))
end
for _, w in ipairs(window_keys) do
  local d = windows[w]
  if (d[1] ~= 0 or d[2] ~= 0) and redis.call('EXISTS', w) == 1 then
    if d[1] ~= 0 then redis.call('HINCRBY', w, 'tok', string.format('%d', d[1])) end
    if d[2] ~= 0 then redis.call('HINCRBY', w, 'req', string.format('%d', d[2])) end
  end
end
for _, ck in ipairs(counter_keys) do
  local c = counters[ck]
  for _, group in ipairs(c[2]) do
    local sums = c[1][group]
    for j = 1, 6 do
      if sums[j] ~= 0 then redis.call('HINCRBY', ck, group .. '\\031' .. metrics[j], string.format('%d', sums[j])) end
    end
  end
  redis.call('EXPIRE', ck, ARGV[2])
end
for _, rk in ipairs(index_keys) do
  local rl = index[rk]
  for i = 1, #rl, 1000 do redis.call('HSET', rk, unpack(rl, i, math.min(i + 999, #rl))) end
  redis.call('EXPIRE', rk, ARGV[4])
end
for _, wk in ipairs(workflow_keys) do
  redis.call('RPUSH', wk, unpack(workflows[wk]))
  redis.call('EXPIRE', wk, ARGV[2])
end
return out
""")
