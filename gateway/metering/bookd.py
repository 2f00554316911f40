"""The booking process: a child of each gateway worker that books its charges (outbox.py is the other end).

    stdin   frames: a 4-byte length, then a pickle. The first is the configuration (`Config` fields), each
            next one `(number, [entry, ...])` (entry.py)
    stdout  8-byte frame numbers: the frame is booked in Redis or, Redis away, in the spool (fsync'd)
    stderr  the log, like the gateway's

Each frame is booked with one pipelined round trip (booking.py, ledger.py) and acked; the spool is
replayed every `spool_replay_interval`. End of stdin (the gateway stopping, or gone): book what was read,
exit. Run by the gateway; not a command of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop

from gateway.metering.booking import Booker, Health
from gateway.metering.entry import charge_of
from gateway.metering.ledger import Ledger, LedgerPolicy
from gateway.metering.outbox import ACK, FRAME
from gateway.metering.pipe import RedisPipe
from gateway.metering.spool import Spool

log = logging.getLogger("qlp.metering")


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; None at the end of stdin."""
    try:
        head = await reader.readexactly(FRAME.size)
        return pickle.loads(await reader.readexactly(FRAME.unpack(head)[0]))
    except asyncio.IncompleteReadError:
        return None


async def serve(acks: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    config = await _read_frame(reader)
    if config is None:
        return
    logging.getLogger().setLevel(config["log_level"])
    pipe = RedisPipe(config["redis_url"], config["redis_timeout"])
    ledger = Ledger(pipe, LedgerPolicy(**config["policy"]))
    spool = Spool(Path(config["spool_path"]))
    health = Health(spool.path, lambda: None)
    booker = Booker(ledger, spool, health)
    with contextlib.suppress(Exception):
        await ledger.load_scripts()  # else: loaded by the first booking that needs them
    replayer = loop.create_task(booker.replay_loop(config["spool_replay_interval"]))
    try:
        while (frame := await _read_frame(reader)) is not None:
            seq, entries = frame
            await booker.book([charge_of(e) for e in entries])
            os.write(acks, ACK.pack(seq))
    finally:
        replayer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replayer
        pipe.close()


def main() -> int:
    # Ctrl-C (and a SIGTERM sent to the process group) reach this process too: the gateway's stop, which
    # closes our stdin once it has sent everything, is what ends it, so that nothing sent is left unbooked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The acks get stdout's pipe to themselves: whatever else writes to stdout lands in the log instead.
    acks = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvloop.run(serve(acks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
