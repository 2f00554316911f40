"""Redaction of secrets from captured text, before anything reaches Redis or an export file.

Captured traffic becomes training data: a key pasted into a prompt, or echoed by a model, must not be
stored, learned, or handed to whoever reads the export. One `Redactor` holds the built-in patterns, the
config's extra patterns and the literal secrets the gateway knows (backend API keys, the admin key), all
compiled once into as few regular expressions as possible, and replaces every match with `[REDACTED]`.

Assumptions:
- Redaction is idempotent (`[REDACTED]` matches nothing that changes it), so the export may re-apply it to
  records that were redacted at capture time.
- For `name = value` assignments and `Bearer <token>` only the value is replaced: the name stays, so a
  conversation about configuration still reads naturally in the training data.
- False positives cost a little training text; false negatives leak a secret. Patterns lean towards the
  former, but stay specific enough not to eat ordinary code (`max_tokens: 100` is left alone).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["BUILTIN_PATTERNS", "MASK", "Redactor"]

MASK = "[REDACTED]"

# Literal secrets shorter than this are not redacted as literals: a 3-character "secret" would mask every
# occurrence of those letters in ordinary text. Real API keys are far longer.
MIN_LITERAL = 8

# (name, pattern). A pattern may define a group named `keep...`: that prefix is kept, the rest is masked.
# Group names must be unique across patterns: they are combined into one alternation.
BUILTIN_PATTERNS: tuple[tuple[str, str], ...] = (
    (
        "pem private key",
        r"-----BEGIN (?P<pem>(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----[\s\S]*?(?:-----END (?P=pem)-----|\Z)",
    ),
    ("anthropic key", r"(?<![A-Za-z0-9_-])sk-ant-[A-Za-z0-9_-]{16,}"),
    ("openai key", r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
    ("qlp api key", r"(?<![A-Za-z0-9_-])qlp-[A-Za-z0-9_-]{32,}"),
    ("aws access key id", r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])"),
    ("github token", r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    ("slack token", r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}"),
    ("jwt", r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    # A bearer token: at least 8 characters with a digit, or 20 and more ("bearer instrument" stays).
    (
        "bearer token",
        r"(?P<keep_bearer>\b[Bb]earer[ \t]+)(?:(?=[A-Za-z._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{8,}|[A-Za-z0-9._~+/=-]{20,})",
    ),
    # `API_KEY=...`, `"password": "..."`, `x-api-key: ...`, `DB_PASSWORD = '...'`: the name may carry
    # prefixes (`DB_`, `x-`) and a `_key`/`_id` suffix; the value ends at white space or a quote (a quoted
    # value: at the closing quote, spaces included; `secret: Bearer x` masks the token, not the word Bearer).
    # A "value" that is itself a name (`secret: "api_key": "x"`, `secret: x-api-key: y`) or a PEM block is
    # no value: the match fails there and the real secret after it is found (atomic groups: no backtracking
    # into a shorter value). `max_tokens: 100` does not match (`tokens` is no name).
    (
        "secret assignment",
        r"(?i)(?P<keep_assign>(?<![A-Za-z0-9_.-])(?:[A-Za-z0-9]+[_.-])*"
        r"(?:api[_-]?key|secret|passw(?:or)?d|token|credentials?|private[_-]?key)(?:[_.-]?(?:key|id))?"
        r"[\"']?[ \t]*[:=][ \t]*[\"']?)"
        r"(?:[Bb]earer[ \t]+)?(?!-----BEGIN )"
        r"(?:(?<=[\"'])(?>[^\"'\n]+)(?![\"']?[ \t]*[:=])|(?<![\"'])(?>[^\s\"'`,;]+)(?<![:=]))",
    ),
)

_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


def _scoped(pattern: str) -> str:
    """`(?i)foo` -> `(?i:foo)`: Python refuses global flags anywhere but at the start of the whole
    expression, so a pattern that brings its own must scope them before it joins an alternation."""
    m = _GLOBAL_FLAGS.match(pattern)
    return f"(?{m.group(1)}:{pattern[m.end() :]})" if m else f"(?:{pattern})"


class Redactor:
    """Replaces secrets in text with `[REDACTED]`. Build once, call from any thread (stateless)."""

    def __init__(self, extra: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        literals = sorted({s for s in secrets if s and len(s) >= MIN_LITERAL}, key=len, reverse=True)
        parts = [re.escape(s) for s in literals]  # longest first: a secret that contains another wins
        parts += [_scoped(p) for _, p in BUILTIN_PATTERNS]
        self._builtin = re.compile("|".join(parts))
        keeps = tuple(g for g in self._builtin.groupindex if g.startswith("keep"))

        def replace(m: re.Match[str]) -> str:
            for g in keeps:
                kept = m.group(g)
                if kept is not None:
                    return kept + MASK
            return MASK

        self._replace = replace
        # Extra patterns come from config and may reuse group names or use back-references: compiled
        # apart from the built-ins, and joined into one expression when they allow it.
        extras = tuple(extra)
        self._extras: tuple[re.Pattern[str], ...] = ()
        if extras:
            try:
                self._extras = (re.compile("|".join(_scoped(p) for p in extras)),)
            except re.error:
                self._extras = tuple(re.compile(p) for p in extras)

    def text(self, s: str) -> str:
        s = self._builtin.sub(self._replace, s)
        for rx in self._extras:
            s = rx.sub(MASK, s)
        return s

    def obj(self, value: Any) -> Any:
        """Every string in a JSON-like value redacted (dict keys are left alone: they are field names)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.obj(v) for v in value]
        if isinstance(value, dict):
            return {k: self.obj(v) for k, v in value.items()}
        return value
