"""The generation engine: continuous batching on one background thread.

One thread owns the model. Each turn of its loop it (1) runs adapter loads and drops released adapters,
(2) admits waiting requests while the batch has room (prefill, one request at a time, then the request's
rows join the running batch), (3) runs one decode step for every running row at once (rows may use
different LoRA adapters: lora.py applies each row's own adapter in the same pass),
(4) hands each request its new text and drops finished or aborted rows. New requests therefore join
between decode steps instead of waiting for the batch to drain.

Why prefill one request at a time: a prompt prefilled alone is computed exactly as a solo request's is,
and decode rows only ever see their own (masked) columns, so a request's tokens do not depend on who else
is in the batch beyond float32 rounding of batched matmuls (GEMMs of different row counts round
differently, ~1e-5 relative): greedy text is the same unless two top logits are that close.

The asyncio side talks to the thread through `submit_all`/`abort_all` (under a condition variable) and gets
`RequestOutput`s through each request's asyncio queue (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .batch import DecodeBatch
from .errors import OverloadedError
from .lora import LoraBank, read_lora
from .outputs import ChoiceDelta, EngineRequest, RequestOutput
from .sampling import TextStream, make_generator, sample_rows

__all__ = ["Engine"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    req: EngineRequest
    index: int
    text: TextStream
    generator: torch.Generator | None
    tokens: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_model_len: int,
        max_batch_size: int,
        max_queue: int,
        eos_token_ids: set[int],
        device: torch.device,
    ) -> None:
        self._model = model
        self._bank = LoraBank(model)
        self._tok = tokenizer
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._eos = eos_token_ids
        self._device = device
        self._cond = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._commands: list[Callable[[], None]] = []
        self._batch: DecodeBatch[_Seq] = DecodeBatch()
        self._adapter_users: collections.Counter[str] = collections.Counter()
        self._released: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- stats read by the metrics collector (plain reads; the GIL makes them consistent enough) ----

    def num_running(self) -> int:
        return len({id(s.req) for s in self._batch.rows})

    def num_waiting(self) -> int:
        return len(self._waiting)

    def kv_usage(self) -> float:
        """KV slots held by the batch over the most it may hold (max_batch_size x max_model_len)."""
        return self._batch.cells() / (self.max_batch_size * self.max_model_len)

    def running_adapters(self) -> set[str]:
        return {s.req.adapter for s in self._batch.rows if s.req.adapter}

    def waiting_adapters(self) -> set[str]:
        return {r.adapter for r in list(self._waiting) if r.adapter}

    # ---- lifecycle ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- asyncio side ----

    def submit(self, req: EngineRequest) -> None:
        req.loop = asyncio.get_running_loop()
        with self._cond:
            # Rows that could not start at the next step if this request came in. A burst that fits the batch
            # passes through `_waiting` for a moment and must not count against the queue.
            rows = len(self._batch) + sum(r.params.n for r in self._waiting) + req.params.n
            if rows - self.max_batch_size > self.max_queue:
                raise OverloadedError(
                    f"The server is at capacity ({len(self._waiting)} requests waiting); retry shortly."
                )
            if req.adapter:
                self._adapter_users[req.adapter] += 1
            self._waiting.append(req)
            self._cond.notify()

    def submit_all(self, reqs: list[EngineRequest]) -> asyncio.Queue[RequestOutput]:
        """Submit requests that report to one queue; all or none (a refusal aborts those already in)."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        done: list[EngineRequest] = []
        try:
            for req in reqs:
                req.queue = queue
                self.submit(req)
                done.append(req)
        except BaseException:
            self.abort_all(done)
            raise
        return queue

    def abort_all(self, reqs: list[EngineRequest]) -> None:
        """Abort whatever of `reqs` is still going; safe to call more than once."""
        with self._cond:
            for req in reqs:
                req.aborted = True
            self._cond.notify()

    async def outputs(
        self, reqs: list[EngineRequest], queue: asyncio.Queue[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of submitted requests until all finished. Leaving early (disconnect, cancel) aborts them."""
        remaining = len(reqs)
        try:
            while remaining:
                out = await queue.get()
                remaining -= out.finished
                yield out
        finally:
            if remaining:
                self.abort_all(reqs)

    async def load_adapter(self, internal_id: str, path: Path) -> None:
        # Reading and checking the file happens off the engine thread (decoding goes on); adding the
        # weights runs on it between steps, so they never change under a running forward.
        weights = await asyncio.to_thread(read_lora, path, self._model)
        await asyncio.wrap_future(self._call_on_engine(lambda: self._bank.add(internal_id, weights)))

    def release_adapter(self, internal_id: str) -> None:
        with self._cond:
            self._released.add(internal_id)
            self._cond.notify()

    def _call_on_engine(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(None)

        with self._cond:
            self._commands.append(run)
            self._cond.notify()
        return fut

    # ---- engine thread ----

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (
                    self._stopping or self._waiting or self._commands or self._batch.rows or self._droppable()
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
                for req in [r for r in self._waiting if r.aborted]:
                    self._waiting.remove(req)
                    self._finish_request(req, "abort")
            for command in commands:
                command()
            self._drop_released_adapters()
            try:
                self._admit()
                if self._batch.rows:
                    self._decode_step()
            except Exception:
                log.exception("engine step failed; failing the running requests")
                self._fail_all("The model server failed while generating; the request was not completed.")
        self._fail_all("The model server is shutting down.")

    def _forward(self, adapters: list[str | None], **inputs: Any) -> torch.Tensor:
        inputs = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        self._bank.active = self._bank.slots(adapters)
        try:
            with torch.inference_mode():
                # Only the last position's logits are sampled: skip the LM head for the rest of a prompt.
                out = self._model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            self._bank.active = None
        logits: torch.Tensor = out.logits[:, -1, :].float().cpu()
        return logits

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or len(self._batch) + self._waiting[0].params.n > self.max_batch_size:
                    return
                req = self._waiting.popleft()
            self._prefill(req)

    def _prefill(self, req: EngineRequest) -> None:
        from transformers import DynamicCache

        cache: Any = DynamicCache(config=self._model.config)
        adapter = req.adapter
        try:
            logits = self._forward([adapter], input_ids=torch.tensor([req.prompt_ids]), cache=cache)
        except Exception:
            log.exception("prefill failed for %s", req.request_id)
            self._emit(req, RequestOutput([], time.monotonic(), finished=True, error="Prefill failed."))
            self._finish_request(req, None)
            return
        seqs = [
            _Seq(req, i, TextStream(self._tok, req.params.stop), make_generator(req.params, i))
            for i in range(req.params.n)
        ]
        rows = logits.expand(len(seqs), -1)
        tokens = sample_rows(rows, [req.params] * len(seqs), [s.generator for s in seqs])
        deltas = [self._advance(s, t) for s, t in zip(seqs, tokens, strict=True)]
        alive = [(s, t) for s, t in zip(seqs, tokens, strict=True) if s.finish_reason is None]
        if alive:
            for layer in cache.layers:
                layer.batch_repeat_interleave(len(alive))
            self._batch.add([s for s, _ in alive], adapter, cache, len(req.prompt_ids), [t for _, t in alive])
        self._publish(req, deltas, finished=not alive)

    def _decode_step(self) -> None:
        batch = self._batch
        for seq in batch.rows:
            if seq.req.aborted:
                seq.finish_reason = "abort"
        self._drop_finished()
        if not batch.rows:
            return
        logits = self._forward(list(batch.adapters), **batch.step_inputs())
        tokens = sample_rows(logits, [s.req.params for s in batch.rows], [s.generator for s in batch.rows])
        batch.advance(tokens)
        per_request: dict[int, tuple[EngineRequest, list[ChoiceDelta]]] = {}
        for seq, token in zip(batch.rows, tokens, strict=True):
            per_request.setdefault(id(seq.req), (seq.req, []))[1].append(self._advance(seq, token))
        for req, deltas in per_request.values():
            # A request is finished when none of its rows is left running after this step.
            finished = all(s.finish_reason is not None for s in batch.rows if s.req is req)
            self._publish(req, deltas, finished=finished)
        self._drop_finished()

    def _advance(self, seq: _Seq, token: int) -> ChoiceDelta:
        seq.tokens += 1
        params = seq.req.params
        if token in self._eos and not params.ignore_eos:
            seq.finish_reason = "stop"
            text = seq.text.finish()
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                seq.finish_reason = "stop"
            elif (
                seq.tokens >= params.max_tokens or len(seq.req.prompt_ids) + seq.tokens >= self.max_model_len
            ):
                seq.finish_reason = "length"
                text += seq.text.finish()
        return ChoiceDelta(seq.index, text, seq.tokens, seq.finish_reason)

    def _drop_finished(self) -> None:
        batch = self._batch
        keep = [i for i, s in enumerate(batch.rows) if s.finish_reason is None]
        if len(keep) == len(batch.rows):
            return
        gone = {id(s.req): s.req for s in batch.rows if s.finish_reason is not None}
        batch.keep(keep)
        still = {id(s.req) for s in batch.rows}
        for key, req in gone.items():
            # Requests that finished normally were published as finished in the step; aborted ones not yet.
            if key not in still and not req.done:
                self._publish(req, [], finished=True)

    def _publish(self, req: EngineRequest, deltas: list[ChoiceDelta], finished: bool) -> None:
        self._emit(req, RequestOutput(deltas, time.monotonic(), finished=finished))
        if finished:
            self._finish_request(req, None)

    def _emit(self, req: EngineRequest, out: RequestOutput) -> None:
        if req.loop is None or req.loop.is_closed():
            return
        out.tag = req.tag
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, out)
        except RuntimeError:  # loop closed between the check and the call (shutdown)
            pass

    def _finish_request(self, req: EngineRequest, reason: str | None) -> None:
        if req.done:
            return
        if reason == "abort":
            self._emit(req, RequestOutput([], time.monotonic(), finished=True))
        req.done = True
        if req.adapter:
            with self._cond:
                self._adapter_users[req.adapter] -= 1

    def _fail_all(self, message: str) -> None:
        reqs = {id(s.req): s.req for s in self._batch.rows}
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in [*reqs.values(), *waiting]:
            self._emit(req, RequestOutput([], time.monotonic(), finished=True, error=message))
            self._finish_request(req, None)
        self._batch = DecodeBatch()

    # ---- adapters (engine thread) ----

    def _droppable(self) -> set[str]:
        # Released adapters that no admitted request uses any more (caller holds self._cond).
        return {a for a in self._released if self._adapter_users[a] <= 0}

    def _drop_released_adapters(self) -> None:
        with self._cond:
            ready = self._droppable()
            self._released -= ready
        for internal_id in ready:
            self._adapter_users.pop(internal_id, None)
            self._bank.remove(internal_id)
