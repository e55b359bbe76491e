"""A helper process fed over a pipe: the recorder's writer (addons/recorder.py) runs in one.

The parent hands over messages (tuples of plain data, pickled, each behind its length) without
ever blocking its event loop: what the pipe cannot take at once waits in the parent, bounded by
``max_backlog`` bytes, and is written when the pipe has room; the child answers (and relays its
log lines) on a second pipe. Without a running loop (tests), writes block, bounded by
``WAIT_TIMEOUT``. The child reads with ``read_frames``, which pauses briefly after a small read so
that it wakes once per batch rather than once per message. Imports nothing from mitmproxy.

Written by hand because the standard library's ``multiprocessing`` would block the loop on a full
pipe and pickles through its own protocol; asyncio's subprocess transports cannot be used from
hooks that run without a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, Literal

logger = logging.getLogger(__name__)

MAX_BACKLOG = 64 * 1024 * 1024  # bytes waiting in the parent for the child; beyond: refused
PIPE_SIZE = 1024 * 1024  # asked of the kernel: a burst waits there, out of the parent's memory
WAIT_TIMEOUT = 10.0  # how long a write without an event loop waits for the child
_FRAME = struct.Struct("!Q")  # every message on both pipes: length, then a pickle

Message = tuple[Any, ...]


def frame(message: Message) -> list[bytes]:
    """``message`` as it goes down a pipe: its length, then its pickle (two parts, written with
    one writev: no copy of a large pickle)."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [_FRAME.pack(len(body)), body]


def read_frames(fd: int, pause: float) -> Iterator[bytes]:
    """The pickles of the messages read from ``fd`` up to its end (a message cut short there:
    the sender died in the middle of it, is dropped). After each read that did not fill much of
    the pipe, waits ``pause`` so that messages arrive in batches: one wake-up per batch rather
    than per flow, which costs the machine less (a wake-up follows each flow mitmdump hands
    over) and leaves the CPUs to mitmdump and its peers between batches. What waits stays in
    the pipe, in the kernel: it outlives mitmdump."""
    try:
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (OSError, AttributeError):  # not Linux: the usual size
        capacity = 64 * 1024
    buf = bytearray()
    while chunk := os.read(fd, capacity):
        buf += chunk
        pos = 0
        while len(buf) - pos >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buf, pos)
            end = pos + _FRAME.size + size
            if len(buf) < end:
                break
            yield bytes(buf[pos + _FRAME.size:end])
            pos = end
        del buf[:pos]
        if len(chunk) < capacity // 4:  # more than that: the reader is behind, no pause
            time.sleep(pause)


class Replies:
    """The child's pipe back to the parent: answers and log lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True

    def send(self, message: Message) -> bool:
        if not self.open:
            return False
        view = memoryview(b"".join(frame(message)))  # small: log lines and sync answers
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:  # mitmdump is gone: nobody to answer any more
            self.open = False
        return self.open


class LogRelay(logging.Handler):
    """The child's log records, sent to the parent to be logged there (stderr once it is gone)."""

    def __init__(self, replies: Replies) -> None:
        super().__init__()
        self.replies = replies

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not self.replies.send(("log", record.levelno, text)):
            with contextlib.suppress(OSError):
                sys.stderr.write(text + "\n")
                sys.stderr.flush()


# -- the parent's side ---------------------------------------------------------------------------
def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Child:
    """One child process and both pipes to it. With an event loop running, nothing
    here blocks it: writes the pipe cannot take wait in ``_pending`` for ``add_writer``, answers
    are read by ``add_reader``. Without one (tests), writes block, bounded by ``WAIT_TIMEOUT``."""

    def __init__(self, argv: list[str], on_message: Callable[[Message], None], label: str,
                 max_backlog: int = MAX_BACKLOG) -> None:
        reply_r, reply_w = os.pipe()
        # Run as a script, a file finds its imports next to it (not with PYTHONSAFEPATH).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
        self.label = label  # how log lines name the child
        self.max_backlog = max_backlog
        try:
            self.proc = subprocess.Popen(
                [*argv, str(reply_w)],
                stdin=subprocess.PIPE, bufsize=0, close_fds=True, pass_fds=(reply_w,), env=env,
            )
        except BaseException:
            os.close(reply_r)
            raise
        finally:
            os.close(reply_w)
        assert self.proc.stdin is not None
        self.started = time.monotonic()
        self._out = self.proc.stdin.fileno()
        self._in = reply_r
        os.set_blocking(self._out, False)
        os.set_blocking(self._in, False)
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default is 64 KB
            fcntl.fcntl(self._out, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._on_message = on_message
        self._pending: deque[bytes | memoryview] = deque()
        self.backlog = 0
        self._received = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None  # where _in (and _out) are watched
        self._writing = False
        self.alive = True
        self._closing = False
        self.synced = 0
        if (loop := running_loop()) is not None:
            self._watch(loop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, parts: list[bytes], force: bool = False) -> Literal["sent", "full", "dead"]:
        """Queue one framed message; "full" (not queued) when ``MAX_BACKLOG`` is reached, unless
        ``force`` (secrets and syncs must never be dropped)."""
        if not self.alive:
            return "dead"
        size = sum(len(part) for part in parts)
        if not force and self._pending and self.backlog + size > self.max_backlog:
            return "full"
        self._pending.extend(parts)
        self.backlog += size
        loop = running_loop()
        if loop is None:
            self._pump(time.monotonic() + WAIT_TIMEOUT, lambda: not self._pending)
        else:
            self._watch(loop)
            self._write_some()
            if self._pending and self.alive and not self._writing:
                loop.add_writer(self._out, self._on_writable)
                self._writing = True
        return "sent" if self.alive else "dead"

    def wait_synced(self, n: int, timeout: float) -> bool:
        return self._pump(time.monotonic() + timeout, lambda: self.synced >= n)

    def close(self, timeout: float) -> None:
        """Hand over what is queued, close the pipe (the child's signal to finish) and wait
        for it to exit; one that takes longer than ``timeout`` finishes on its own."""
        deadline = time.monotonic() + timeout
        if self.alive:
            self._pump(deadline, lambda: not self._pending)
        self._closing = True
        self._unwatch()
        lost = len(self._pending)
        self._pending.clear()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the end of the pipe: the child finishes and exits
        self._pump(deadline, lambda: not self.alive)  # its last log lines, up to its exit
        self._close_pipes()
        try:
            code = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) is still writing after %.0fs; it finishes on its own",
                         self.label, self.proc.pid, timeout)
            return
        if code != 0 or lost:
            logger.error("%s exited with code %s%s", self.label, code,
                         f"; {lost} message(s) not handed over" if lost else "")

    def discard(self) -> None:
        """Let go of a child that died (already logged): its pipes, and its exit status."""
        self._closing = True
        self._died()
        self._close_pipes()
        self.proc.poll()

    def _close_pipes(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        if self._in >= 0:
            with contextlib.suppress(OSError):
                os.close(self._in)
            self._in = -1  # never close a number the process may have reused

    # -- the loop's callbacks and the blocking pump ---------------------------------------------
    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop or not self.alive:
            return
        self._unwatch()
        loop.add_reader(self._in, self._on_readable)
        self._loop = loop

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            with contextlib.suppress(Exception):  # a loop closed under us has nothing to remove
                loop.remove_reader(self._in)
                if self._writing:
                    loop.remove_writer(self._out)
        self._writing = False

    def _on_writable(self) -> None:
        self._write_some()
        if (not self._pending or not self.alive) and self._writing and self._loop is not None:
            self._loop.remove_writer(self._out)
            self._writing = False

    def _write_some(self) -> None:
        pending = self._pending
        while pending and self.alive:
            try:
                written = os.writev(self._out, list(islice(pending, 64)))
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the child is gone
                self._died()
                return
            self.backlog -= written
            while written:
                head = pending[0]
                if written < len(head):
                    pending[0] = memoryview(head)[written:]
                    break
                written -= len(head)
                pending.popleft()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._in, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self._received += data
        while len(self._received) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self._received)
            if len(self._received) < _FRAME.size + size:
                break
            body = bytes(self._received[_FRAME.size:_FRAME.size + size])
            del self._received[:_FRAME.size + size]
            message = pickle.loads(body)
            if message[0] == "synced":
                self.synced = max(self.synced, message[1])
            else:
                self._on_message(message)

    def _pump(self, deadline: float, done: Callable[[], bool]) -> bool:
        """Write and read, blocking, until ``done()`` or the deadline (reading too, so a child
        blocked on its log lines never deadlocks with us)."""
        while True:
            self._write_some()
            if done():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.alive:
                break
            poller = select.poll()  # not select.select: a busy mitmdump has fds past FD_SETSIZE
            poller.register(self._in, select.POLLIN)
            if self._pending:
                poller.register(self._out, select.POLLOUT)
            if any(fd == self._in for fd, _ in poller.poll(remaining * 1000)):
                self._on_readable()
        if not self._pending and self._writing and self._loop is not None:
            self._loop.remove_writer(self._out)
            self._writing = False
        return done()

    def _died(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._unwatch()
        self._pending.clear()
        self.backlog = 0
        if not self._closing:
            code = self.proc.poll()
            logger.error("%s (pid %d) stopped (exit code %s); what it had not written is "
                         "lost, a new one starts when needed", self.label, self.proc.pid, code)
