"""Metering: API keys, prices, budgets, rate limits and the cost ledger in Redis (docs/metering.md).

keys.py      key format, hashing, the key store          pricing.py   prices, integer cost math
layout.py    every Redis key name (hash-tagged)          estimate.py  local token estimates
scripts.py   the Lua scripts (admit, charge)             ledger.py    running them; the Charge record
pipe.py      the auto-pipelined Redis connection         booking.py   charge queue, spool replay, Redis health
spool.py     charges waiting for Redis, on disk          meter.py     what the request path calls
reader.py    summaries, workflows, export                routes.py    /v1/ledger/*, /v1/admin/keys
keys_cli.py  `qlp keys`                                  ledger_cli.py `qlp ledger`
lease.py     admission leases: a busy key admitted in-process from an allowance reserved in Redis
"""
