"""Every Redis key the metering uses, in one place (docs/metering.md has the table).

All of a request's state lives in the slot of its API key: the hash tag `{k:<key id>}`. An opaque key
(`qlp-<random>`) says nothing about its tenant, so the request path can only address what is reachable
from the key itself; keeping the key's ledger there too makes each script touch one slot (Redis Cluster)
and a charge one atomic script. A tenant's ledger is the union of its keys' ledgers: readers list the
tenant's keys (an unslotted set, off the request path) and add up. The bootstrap admin key, which has no
record, books under the pseudo key id `admin` (tenant `admin`).
"""

from __future__ import annotations

import re
import time

__all__ = ["ADMIN_KEY_ID", "KEY_INDEX", "TENANTS", "TENANT_NAME", "KeyKeys", "day_of", "month_of", "tenant_keys"]

KEY_INDEX = "qlp:keys"  # SET of every key id
TENANTS = "qlp:tenants"  # SET of tenant names
ADMIN_KEY_ID = "admin"  # the bootstrap admin key's ledger
# No braces (hash tags), colons or separators in tenant names: they become parts of key names.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def tenant_keys(tenant: str) -> str:
    """SET of the key ids of one tenant (revoked keys stay: their ledger is still the tenant's)."""
    return f"qlp:tenant:{tenant}:keys"


def day_of(ts_ms: int) -> str:
    """UTC day of a millisecond timestamp: YYYYMMDD."""
    return time.strftime("%Y%m%d", time.gmtime(ts_ms // 1000))


def month_of(ts_ms: int) -> str:
    return time.strftime("%Y%m", time.gmtime(ts_ms // 1000))


class KeyKeys:
    """The keys in the slot of one API key."""

    __slots__ = ("p",)

    def __init__(self, key_id: str) -> None:
        self.p = f"qlp:{{k:{key_id}}}"

    # -- identity and limits --------------------------------------------------------------------------
    @property
    def record(self) -> str:
        """HASH: sha256 tenant role name created revoked rpm tpm budget_day budget_month (set by `qlp keys`)
        and the budget state the scripts keep: reserved spent_d spent_d_on spent_m spent_m_on."""
        return self.p + ":key"

    def window(self, minute: int) -> str:  # HASH req tok: one rate-limit window (epoch minute)
        return f"{self.p}:rl:{minute}"

    @property
    def reservations(self) -> str:  # ZSET "<charge id>:<micro-dollars>" -> expiry (ms)
        return self.p + ":resv"

    # -- the ledger ------------------------------------------------------------------------------------
    def done(self, day: str) -> str:  # SET charge ids applied (idempotency), by the charge's UTC day
        return f"{self.p}:done:{day}"

    def counters(self, day: str) -> str:  # HASH "<tier>^_<backend/model>^_<agent>^_<workflow>^_<metric>" -> int
        return f"{self.p}:c:{day}"

    @property
    def stream(self) -> str:  # STREAM of ledger records (field "r": JSON)
        return self.p + ":ledger"

    def workflow_records(self, workflow: str) -> str:  # LIST of the workflow's ledger records (JSON)
        return f"{self.p}:wf:{workflow}"

    def requests(self, day: str) -> str:
        """HASH request id -> the ledger stream entry id of its record, for the requests booked on that UTC
        day (feedback finds requests by it). A request id reused by the client points at its latest record."""
        return f"{self.p}:rqd:{day}"

    def request(self, request_id: str) -> str:
        """STRING: the request index before it was kept by day (read by feedback until such keys expire)."""
        return f"{self.p}:rq:{request_id}"
