"""The local spool: charges that could not reach Redis, kept on disk until they can.

An append-only JSONL file, one charge per line, fsync'd before `append` returns. Appends are group
committed: whoever finds the file free writes every line queued so far with one fsync, so an outage does
not cost one fsync per request. Several gateway processes may share one spool path:

  * writers hold a shared `flock` on `<spool>.lock` while they open, append, fsync and close the file;
  * a replayer takes the lock exclusively only to rename the file to `<spool>.replay-<pid>-<ns>` (new
    charges then go to a fresh file), and holds an exclusive `flock` on the renamed file while replaying
    it, so two replayers never work on the same file. A file is deleted once every charge in it was
    applied; a replay cut short leaves it for the next attempt, which is safe because charges are
    idempotent (gateway/metering/scripts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson

from gateway.metering.ledger import Charge

__all__ = ["Spool"]

log = logging.getLogger("qlp.metering")

BATCH = 200


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._pending: list[bytes] = []
        self._lock = asyncio.Lock()
        self._next_flush = 1  # number of the next flush to start; it takes every pending line
        self._flushed = 0  # number of the last flush that reached the disk

    # -- writing ---------------------------------------------------------------------------------------
    async def append(self, charges: list[Charge]) -> None:
        """Returns once the charges are on disk (fsync'd). Raises OSError when the disk refuses them."""
        self._pending.extend(c.to_json() + b"\n" for c in charges)
        mine = self._next_flush
        async with self._lock:
            if self._flushed >= mine:
                return  # a flush that started after our append wrote our line
            batch, self._pending = self._pending, []
            no = self._next_flush
            self._next_flush += 1
            try:
                await asyncio.to_thread(self._write, b"".join(batch))
            except OSError:
                self._pending[:0] = batch  # the next flush retries these lines
                raise
            self._flushed = no

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self.lock_path, fcntl.LOCK_SH):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)

    def reject(self, charge: Charge, reason: str) -> None:
        """Keep a charge that Redis refused (a script error, not an outage) in `<spool>.rejected`: it is
        not replayed automatically; an operator looks at it. Nothing is dropped silently."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = orjson.dumps({"reason": reason[:500], "charge": orjson.loads(charge.to_json())}) + b"\n"
        fd = os.open(self.path.with_name(self.path.name + ".rejected"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------------
    def _replay_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(self.path.name + ".replay-*"))

    def has_pending(self) -> bool:
        return (
            bool(self._pending) or (self.path.is_file() and self.path.stat().st_size > 0) or bool(self._replay_files())
        )

    def depth(self) -> int:
        """Charges waiting (lines on disk, plus lines queued for the disk)."""
        n = len(self._pending)
        for p in [self.path, *self._replay_files()]:
            with contextlib.suppress(FileNotFoundError):
                n += p.read_bytes().count(b"\n")
        return n

    def _claim(self) -> None:
        if not self.path.is_file():
            return
        with _flock(self.lock_path, fcntl.LOCK_EX):
            if self.path.is_file() and self.path.stat().st_size > 0:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.replay-{os.getpid()}-{time.time_ns()}"))

    async def replay(self, apply: Callable[[list[Charge]], Awaitable[object]]) -> int:
        """Apply every spooled charge through `apply` (batches of BATCH). Returns how many were applied.
        An exception from `apply` stops the replay; what was not applied stays on disk."""
        if not self.path.parent.is_dir():
            return 0
        await asyncio.to_thread(self._claim)
        done = 0
        for f in self._replay_files():
            fd = os.open(f, os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process replays this file
                if not f.exists():
                    continue  # replayed and removed while we waited for it
                charges = []
                for line in (await asyncio.to_thread(f.read_bytes)).splitlines():
                    try:
                        charges.append(Charge.from_json(line))
                    except (ValueError, TypeError):
                        log.error("spool %s: skipping a line that is not a charge (%d bytes)", f.name, len(line))
                for i in range(0, len(charges), BATCH):
                    await apply(charges[i : i + BATCH])
                f.unlink()
                done += len(charges)
            finally:
                os.close(fd)
        return done
