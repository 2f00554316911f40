"""The gateway's side of the booking process (bookd.py): entries go out in batches, come back as acks.

Booking a charge (its ledger record, the CHARGE call, Redis's reply, the spool when Redis is away) costs
the event loop that does it about as much as everything else metering does per request. The gateway's
worker is one event loop on one core, so that work runs in a child process of each worker: `queue` adds
an entry (entry.py) to a list, and every BOOK_DELAY_SECONDS the list goes to the child as one frame over
its stdin (a pickle: both ends are this code). The child books or spools the frame and acks its number on
its stdout.

Nothing is lost when the child is: a frame stays here until it is acked. When the child exits while the
gateway runs (a crash, a kill), the frames not acked yet and everything after them are booked in the
gateway process instead (`fallback`: the in-process Booker), which is slower but the same booking;
a frame the child had applied in part is applied again, which changes nothing (charges are idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from gateway.metering.booking import BOOK_DELAY_SECONDS
from gateway.metering.entry import Entry

__all__ = ["FRAME", "Outbox"]

log = logging.getLogger("qlp.metering")

FRAME = struct.Struct(">I")  # the length of the pickle that follows; acks are ">Q" frame numbers
ACK = struct.Struct(">Q")
STOP_SECONDS = 30.0  # how long `stop` waits for the child to book what it was sent


class _Acks(asyncio.Protocol):
    """Reads the child's stdout: frame numbers, each once its frame is booked or spooled."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = len(self.buf) // ACK.size * ACK.size
        if n:
            acked = [ACK.unpack_from(self.buf, i)[0] for i in range(0, n, ACK.size)]
            self.buf = self.buf[n:]
            self.outbox._acked(max(acked))

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbox._child_gone()


class Outbox:
    def __init__(self, config: dict[str, Any], fallback: Callable[[list[Entry]], None]) -> None:
        self._config = config  # for the child: Redis, the ledger policy, the spool (bookd.Config)
        self._fallback = fallback
        self._queue: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sent: dict[int, list[Entry]] = {}  # frames not acked yet, by number (in order)
        self._seq = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: asyncio.WriteTransport | None = None
        self._early: list[bytes] = []  # frames written before the pipe is connected
        self._connecting: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set while nothing is waiting for an ack
        self._idle.set()
        self._stopping = False
        self.inline = True  # booking in this process (before start, after the child is gone)

    def start(self) -> None:
        """Start the child. It reads its settings from the first frame; until it answers, frames wait in
        the pipe. A child that cannot be started leaves booking in this process (logged)."""
        loop = asyncio.get_running_loop()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "gateway.metering.bookd"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, start_new_session=False)
        except OSError as exc:
            log.error("could not start the booking process (%s): charges are booked in this process", exc)
            return
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self.inline = False
        self._write_frame(pickle.dumps(self._config))
        self._connecting = loop.create_task(self._connect(self._proc.stdin, self._proc.stdout))

    async def _connect(self, stdin: Any, stdout: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            out, _ = await loop.connect_write_pipe(asyncio.Protocol, stdin)
            await loop.connect_read_pipe(lambda: _Acks(self), stdout)
        except OSError as exc:
            log.error("could not talk to the booking process (%s)", exc)
            self._child_gone()
            return
        out.write(b"".join(self._early))
        self._early.clear()
        self._out = out

    def _write_frame(self, payload: bytes) -> None:
        data = FRAME.pack(len(payload)) + payload
        if self._out is None:
            self._early.append(data)
        else:
            self._out.write(data)

    def queue(self, e: Entry) -> None:
        if self.inline:
            self._fallback([e])
            return
        self._queue.append(e)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BOOK_DELAY_SECONDS, self._flush)

    def _flush(self) -> None:
        self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        if self.inline:
            self._fallback(batch)
            return
        self._seq += 1
        self._sent[self._seq] = batch
        self._idle.clear()
        self._write_frame(pickle.dumps((self._seq, batch), pickle.HIGHEST_PROTOCOL))

    def _acked(self, seq: int) -> None:
        for n in [n for n in self._sent if n <= seq]:
            del self._sent[n]
        if not self._sent:
            self._idle.set()

    def _child_gone(self) -> None:
        """The child's stdout closed: it exited. What it did not ack is booked here, in order."""
        if self.inline:
            return
        self.inline = True
        code = self._proc.poll() if self._proc is not None else None
        if not self._stopping:
            log.error("the booking process exited (code %s): charges are booked in this process from now on", code)
        pending = [e for n in sorted(self._sent) for e in self._sent[n]] + self._queue
        self._sent.clear()
        self._queue = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if pending:
            self._fallback(pending)
        self._idle.set()

    async def drain(self) -> None:
        """Wait until every entry queued so far is booked (or spooled)."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
        await self._idle.wait()

    async def stop(self) -> None:
        """Book what is queued, then let the child finish and exit (end of its stdin)."""
        if self._connecting is not None:
            await self._connecting
        await self.drain_for(STOP_SECONDS)
        self._stopping = True
        if self._out is not None:
            self._out.close()
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, STOP_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("the booking process did not exit within %.0f s: killed", STOP_SECONDS)
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        self._child_gone()  # anything still not acked is booked here

    async def drain_for(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), seconds)
