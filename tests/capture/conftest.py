"""Capture fixtures: the canaries every test plants (Redis and the metered gateway are tests/conftest.py's).

A canary is a secret of one kind that must never reach the capture stream or an export file.
"""

from __future__ import annotations

# Each canary carries the marker "CANARY<n>" inside the secret itself: a test searches raw bytes for
# "CANARY", and any hit is a leak (the texts around the canaries never say it).
CANARIES: dict[str, str] = {
    "openai": "sk-proj-CANARY1abcdefghijklmnopqrstuvwxyz0123",
    "openai legacy": "sk-CANARY2abcdefghijklmnopqrstuvwxyz0123",
    "anthropic": "sk-ant-api03-CANARY3abcdefghijklmnopqrstuvwxyz",
    "qlp key": "qlp-CANARY4abcdefghijklmnopqrstuvwxyz0123456789",
    "bearer": "Bearer CANARY5token0123456789",
    "aws": "AKIACANARY6ABCDEFGHI",
    "github": "ghp_CANARY7abcdefghijklmnopqrstuvwxyz0123",
    "github pat": "github_pat_CANARY8abcdefghijklmnopqrstuvwxyz",
    "slack": "xoxb-CANARY9-1234567890",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJDQU5BUlkxMCJ9.CANARY10signature",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpCANARY11\nabc+/=\n-----END RSA PRIVATE KEY-----",
    "assignment": "DB_PASSWORD=CANARY12hunter2",
    "json assignment": '"api_key": "CANARY13 with spaces"',
    "header": "x-api-key: CANARY14xyz",
}
MARKERS = {name: f"CANARY{i}" for i, name in enumerate(CANARIES, start=1)}


def planted() -> str:
    """One text carrying every canary, in prose, code and JSON around it."""
    return "\n".join(f"here is my {name} secret: {value} -- thanks, ünïcödé 中文" for name, value in CANARIES.items())
