"""Redaction: every built-in kind of secret is masked, in any context, and ordinary text is left alone."""

from __future__ import annotations

import re
import time

import pytest

from gateway.capture.redact import MASK, Redactor
from tests.capture.conftest import CANARIES, MARKERS, planted


@pytest.mark.parametrize("kind", list(CANARIES))
def test_each_builtin_secret_kind_is_masked(kind: str) -> None:
    r = Redactor()
    for text in (
        CANARIES[kind],
        f"before {CANARIES[kind]} after",
        f"«{CANARIES[kind]}»\n",
        f'{{"content": "{CANARIES[kind]}"}}',
    ):
        out = r.text(text)
        assert MARKERS[kind] not in out, out
        assert MASK in out


def test_every_canary_in_one_text_is_masked_and_the_prose_kept() -> None:
    out = Redactor().text(planted())
    assert "CANARY" not in out
    assert out.count("ünïcödé 中文") == len(CANARIES)
    assert "here is my openai secret: [REDACTED] -- thanks" in out


def test_assignment_keeps_the_name_and_masks_the_value() -> None:
    r = Redactor()
    assert r.text("DB_PASSWORD=abc123 next") == "DB_PASSWORD=[REDACTED] next"
    assert r.text('"api_key": "two words"') == '"api_key": "[REDACTED]"'
    assert r.text("Authorization: Bearer abc123xyz987") == "Authorization: Bearer [REDACTED]"


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens: 100",
        "the bearer instrument",
        "def tokenize(s): return s.split()",
        "task-abcdefghijklmnopqrstuvwxyz0123",
        "use qlp-t0 for cheap work",
        "password policy: see the wiki",
        "naïve café 東京 — ok",
        "",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor().text(text) == text


def test_redaction_is_idempotent_so_export_can_reapply_it() -> None:
    r = Redactor(["(?i)internal-[a-z]+"], ["literalsecret-1234"])
    once = r.text(planted() + " internal-project literalsecret-1234")
    assert r.text(once) == once


def test_overlapping_secrets_leave_no_fragment() -> None:
    r = Redactor(secrets=["sk-proj-CANARYlonglonglong-abcdefghijklmnop", "CANARYlonglonglong"])
    # A literal inside a pattern match, a pattern match inside an assignment, a key inside a PEM block.
    text = (
        "token=sk-proj-CANARYlonglonglong-abcdefghijklmnop and CANARYlonglonglong and "
        "-----BEGIN PRIVATE KEY-----\nsk-ant-api03-CANARYxxxxxxxxxxxxxxxxxx\n-----END PRIVATE KEY-----"
    )
    out = r.text(text)
    assert "CANARY" not in out
    assert "PRIVATE KEY" not in out


def test_a_pem_block_cut_before_its_end_is_masked_to_the_end() -> None:
    out = Redactor().text("key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nCANARYabc\nmore")
    assert out == "key:\n[REDACTED]"


def test_literal_secrets_and_config_patterns_are_masked() -> None:
    r = Redactor(["(?i)hunter\\d+", r"ACME-\d{4}"], ["s3cr3t-backend-key"])
    assert (
        r.text("pw HUNTER22, ticket ACME-1234, key s3cr3t-backend-key.")
        == "pw [REDACTED], ticket [REDACTED], key [REDACTED]."
    )


def test_config_patterns_with_their_own_groups_still_work() -> None:
    r = Redactor([r"(?P<x>a)(?P=x)b", r"(?P<x>z)(?P=x)y"])
    assert r.text("aab zzy c") == f"{MASK} {MASK} c"


def test_short_literal_secrets_do_not_mask_ordinary_words() -> None:
    assert Redactor(secrets=["abc", ""]).text("abc abc") == "abc abc"


def test_nested_values_are_redacted_and_keys_kept() -> None:
    value = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "function": {"name": "login", "arguments": '{"password": "CANARYpw"}'}}],
    }
    out = Redactor().obj(value)
    assert "CANARY" not in str(out)
    assert out["tool_calls"][0]["function"]["name"] == "login" and out["content"] is None


def test_a_megabyte_of_text_is_redacted_in_linear_time() -> None:
    r = Redactor(["(?i)hunter\\d"], ["literalsecret-1234"])
    chunk = "def f(x):\n    return x + 1  # max_tokens: 5, é 中文 a_b_c-d.e\n"
    big = chunk * (1_000_000 // len(chunk)) + CANARIES["openai"]
    t = time.perf_counter()
    out = r.text(big)
    elapsed = time.perf_counter() - t
    assert "CANARY" not in out and out.startswith(chunk)
    assert elapsed < 5, elapsed  # ~0.3 s on the 2-core dev machine; quadratic behaviour would take minutes
    # Pathological shapes for the assignment and bearer patterns stay linear too.
    for evil in ("a_" * 200_000, "Bearer " * 50_000, "x-" * 200_000 + "=", "-----BEGIN PRIVATE KEY-----" * 10_000):
        t = time.perf_counter()
        r.text(evil)
        assert time.perf_counter() - t < 5, evil[:20]


def test_builtin_patterns_compile_into_one_expression() -> None:
    # One pass over the text for all built-in patterns and literals (the expensive part of capture).
    r = Redactor(secrets=["literalsecret-1234"])
    assert isinstance(r._builtin, re.Pattern) and r._extras == ()
