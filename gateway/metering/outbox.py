"""The gateway's side of the booking process (bookd.py): entries go out in batches, come back as acks.

Booking a charge (its ledger record, the CHARGE call, Redis's reply, the spool when Redis is away) costs
the event loop that does it about as much as everything else metering does per request. The gateway's
worker is one event loop on one core, so that work runs in a child process of each worker: `queue` adds
an entry (entry.py) to a list, and every BOOK_DELAY_SECONDS the list goes to the child as one frame over
its stdin (a pickle: both ends are this code). The child books or spools the frame and acks its number on
its stdout.

Nothing is lost when the child is: a frame stays here until it is acked. When the child exits while the
gateway runs (a crash, a kill), the frames not acked yet, and everything queued until a new child runs,
are booked in the gateway process instead (`fallback`: the in-process Booker), which is slower but the
same booking; a frame the child had applied in part is applied again, which changes nothing (charges are
idempotent). A new child is started after RESTART_SECONDS (doubled, up to a minute, while children die
within a minute of their start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.metering.booking import BOOK_DELAY_SECONDS
from gateway.metering.entry import Entry

__all__ = ["FRAME", "Outbox"]

log = logging.getLogger("qlp.metering")

FRAME = struct.Struct(">I")  # the length of the pickle that follows; acks are ">Q" frame numbers
ACK = struct.Struct(">Q")
STOP_SECONDS = 30.0  # how long `stop` waits for the child to book what it was sent
RESTART_SECONDS = 1.0  # pause before a dead child is replaced, doubled while children die young
RESTART_MAX_SECONDS = 60.0


class _Acks(asyncio.Protocol):
    """Reads one child's stdout: frame numbers, each once its frame is booked or spooled."""

    def __init__(self, outbox: Outbox, proc: subprocess.Popen[bytes]) -> None:
        self.outbox = outbox
        self.proc = proc
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = len(self.buf) // ACK.size * ACK.size
        if n:
            acked = [ACK.unpack_from(self.buf, i)[0] for i in range(0, n, ACK.size)]
            self.buf = self.buf[n:]
            self.outbox._acked(max(acked))

    def connection_lost(self, exc: Exception | None) -> None:
        self.outbox._child_gone(self.proc)


class Outbox:
    def __init__(self, config: dict[str, Any], fallback: Callable[[list[Entry]], None]) -> None:
        self._config = config  # the child's settings (Redis, the ledger policy, the spool): its first frame
        self._fallback = fallback
        self._queue: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sent: dict[int, list[Entry]] = {}  # frames not acked yet, by number (in order)
        self._seq = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._out: asyncio.WriteTransport | None = None
        self._early: list[bytes] = []  # frames written before the pipe is connected
        self._connecting: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._backoff = RESTART_SECONDS
        self._idle = asyncio.Event()  # set while nothing is waiting for an ack
        self._idle.set()
        self._stopping = False
        self.inline = True  # booking in this process (before start, while there is no child)

    def start(self) -> None:
        """Start a child. It reads its settings from the first frame; until it runs, frames wait in the
        pipe. A child that cannot be started leaves booking in this process (logged, tried again later)."""
        self._restart = None
        if self._stopping:
            return
        try:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.metering.bookd"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
        except OSError as exc:
            log.error("could not start the booking process (%s): charges are booked in this process", exc)
            self._retry_later()
            return
        self._proc, self._out, self._early = proc, None, []
        self._started_at = time.monotonic()
        self.inline = False
        self._write_frame(pickle.dumps(self._config))
        self._connecting = asyncio.get_running_loop().create_task(self._connect(proc))

    async def _connect(self, proc: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        try:
            out, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
            await loop.connect_read_pipe(lambda: _Acks(self, proc), proc.stdout)
        except OSError as exc:
            log.error("could not talk to the booking process (%s)", exc)
            proc.kill()
            self._child_gone(proc)
            return
        if proc is self._proc:
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

    def _child_gone(self, proc: subprocess.Popen[bytes]) -> None:
        """`proc`'s stdout closed: it exited. What it did not ack is booked here, in order; a new child is
        started after a pause (longer each time one dies young)."""
        if proc is not self._proc or self.inline:
            return
        self.inline = True
        self._out = None
        if proc.poll() is None:  # it closed its acks but lives on: it cannot be trusted with more
            proc.kill()
        code = proc.wait()
        pending = [e for n in sorted(self._sent) for e in self._sent[n]] + self._queue
        self._sent.clear()
        self._queue = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if pending:
            self._fallback(pending)
        self._idle.set()
        if not self._stopping:
            log.error("the booking process exited (code %s): charges are booked in this process until it is "
                      "started again", code)
            self._retry_later()

    def _retry_later(self) -> None:
        lived = time.monotonic() - self._started_at
        self._backoff = RESTART_SECONDS if lived > RESTART_MAX_SECONDS else min(self._backoff * 2, RESTART_MAX_SECONDS)
        self._restart = asyncio.get_running_loop().call_later(self._backoff, self.start)

    async def drain(self) -> None:
        """Wait until every entry queued so far is booked (or spooled)."""
        if self._timer is not None:
            self._timer.cancel()
        self._flush()
        await self._idle.wait()

    async def stop(self) -> None:
        """Book what is queued, then let the child finish and exit (end of its stdin)."""
        if self._restart is not None:
            self._restart.cancel()
        if self._connecting is not None:
            await self._connecting
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), STOP_SECONDS)
        self._stopping = True
        proc = self._proc
        if proc is None or self.inline:
            return
        if self._out is not None:
            self._out.close()
        try:
            await asyncio.to_thread(proc.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("the booking process did not exit within %.0f s: killed", STOP_SECONDS)
            proc.kill()
        self._child_gone(proc)  # anything still not acked is booked here
