"""A few seconds of bench/soak.py, so the soak keeps working between its long runs (docs/reliability.md):
mixed streaming and non-streaming traffic with dropped clients through `qlp gateway`, metering on."""

from __future__ import annotations

import os
import shutil

import pytest

from bench.soak import run

SECONDS = float(os.environ.get("QLP_SOAK_SMOKE_SECONDS", "8"))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (make sysdeps)")
def test_short_soak_has_no_errors_flat_memory_and_a_ledger_equal_to_the_upstream(tmp_path) -> None:
    res = run(seconds=SECONDS, rps=30, concurrency=8, seed=7, workdir=tmp_path)
    s = res.summary()
    assert res.requests >= SECONDS * 20 and set(res.by_kind) == {"plain", "stream", "drop"}, s
    assert res.error_count == 0, s
    assert res.ledger_ok and res.ledger["records"] == res.ledger["served_upstream"] == res.requests, s
    assert res.rss_growth < 0.10, s
    assert res.gateway_log_errors == 0, s
