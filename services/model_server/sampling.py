"""Per-sequence token choice and text: sampling parameters, the sampler, incremental detokenization, stops.

Each sequence owns its `torch.Generator`, so a seeded request draws the same tokens whether it runs alone
or in a batch (its logits row is the same; see engine.py for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GREEDY_EPS", "SamplingParams", "TextStream", "make_generator", "sample_rows"]

# vLLM treats a temperature below this as greedy.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end token

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def make_generator(params: SamplingParams, choice: int) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator()
    # Choices of one seeded request differ from each other but each is reproducible.
    if params.seed is None:
        gen.seed()  # a fresh non-deterministic seed, without touching torch's global generator
    else:
        gen.manual_seed((params.seed + choice) % 2**64)
    return gen


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Pick one token per row of `logits` (rows x vocab, float32)."""
    greedy_ids = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy or gen is None:
            out.append(int(greedy_ids[row]))
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            pick = torch.multinomial(sorted_probs, 1, generator=gen)
            out.append(int(order[pick]))
        else:
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


class TextStream:
    """Token ids in, text deltas out, for one sequence.

    Incremental decoding follows vLLM's prefix/read offsets so a multi-byte character split across tokens is
    held back until complete. Stop strings: text is cut before the first stop string, and text that could
    still turn into one is held back, so a streamed delta never has to be taken back. The full text is, by
    construction, the concatenation of the deltas: streaming and non-streaming give the same text.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # decoded so far (may include held-back text)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to emit ("" if none)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: flush whatever is held back (an incomplete character is emitted as is)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self._stop:
            longest = max(len(s) for s in self._stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            if not final:
                return self._take(len(self.text) - self._partial_stop_suffix())
        return self._take(len(self.text))

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
