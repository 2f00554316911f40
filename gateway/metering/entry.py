"""What the request path hands to booking: one flat tuple per request, an `Entry`.

`Meter.settle` builds it on the request's event loop, where every microsecond is paid by the requests:
a tuple of plain values is cheap to build and to pickle to the booking process (outbox.py). The booking
side turns it into a `Charge` with its full ledger record (`charge_of`), builds the Redis calls and books
them: that work is done off the gateway's event loop.

    Entry = (charge id, ts ms, tenant, key id booked under, key_state, reserved micros, cost micros,
             token delta, minute, request delta, served)
    served = None (nothing reached the client: only the key's state is corrected) or
             (request id, key id of the record, workflow, agent, arm, tier, requested tier, backend, model,
              endpoint, stream, prompt tokens, completion tokens, cached tokens, reference cost micros,
              reference model, latency ms, status, estimated, attempts, fallback tiers)
"""

from __future__ import annotations

from typing import Any

from gateway.metering.ledger import SEP, Charge

__all__ = ["Entry", "charge_of", "entry_of"]

Entry = tuple[Any, ...]


def charge_of(e: Entry) -> Charge:
    """The charge (with its ledger record) an entry stands for."""
    cid, ts, tenant, key_id, key_state, reserved, cost, token_delta, minute, request_delta, served = e
    if served is None:
        return Charge(cid, ts, tenant, key_id, key_state, reserved, cost, token_delta, minute,
                      request_delta=request_delta)
    (request_id, record_key_id, workflow, agent, arm, tier, requested_tier, backend, model, endpoint, stream,
     prompt, completion, cached, reference_cost, reference_model, latency_ms, status, estimated, attempts,
     fallback) = served
    record = {
        "id": cid, "request_id": request_id, "ts": ts, "tenant": tenant, "key_id": record_key_id,
        "workflow": workflow, "agent": agent, "arm": arm, "tier": tier, "requested_tier": requested_tier,
        "backend": backend, "model": model, "endpoint": endpoint, "stream": stream,
        "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
        "cost_micros": cost, "reference_cost_micros": reference_cost, "reference_model": reference_model,
        "latency_ms": latency_ms, "status": status, "estimated": estimated, "attempts": attempts,
        "fallback": list(fallback),
    }
    parts = (tier, f"{backend}/{model}", agent or "", workflow or "")
    group = SEP.join(parts)
    if group.count(SEP) != 3:  # a separator inside a value (agent and workflow come from headers)
        group = SEP.join([v.replace(SEP, " ") for v in parts])
    return Charge(cid, ts, tenant, key_id, key_state, reserved, cost, token_delta, minute, record, group,
                  request_delta)


def entry_of(c: Charge) -> Entry:
    """A charge without a record (a lease's release, an unserved request) as an entry."""
    assert c.record is None
    return (c.id, c.ts_ms, c.tenant, c.key_id, c.key_state, c.reserved_micros, c.cost_micros, c.token_delta,
            c.minute, c.request_delta, None)
