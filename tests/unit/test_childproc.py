"""The pipe protocol of llmitm/childproc.py on its own: framing, batching, a message cut short."""

from __future__ import annotations

import os
import pickle
import threading

from llmitm.childproc import frame, read_frames


def test_messages_come_out_whole_and_in_order_and_a_cut_one_is_dropped() -> None:
    read_fd, write_fd = os.pipe()
    messages = [("flow", "p", b"x" * 200_000), ("sync", 1), ("log", 20, "é")]

    def send() -> None:
        for message in messages:
            for part in frame(message):
                view = memoryview(part)
                while view:
                    view = view[os.write(write_fd, view):]
        last = b"".join(frame(("flow", "cut", b"y" * 100)))
        os.write(write_fd, last[: len(last) // 2])  # the sender died mid-message
        os.close(write_fd)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = [pickle.loads(body) for body in read_frames(read_fd, pause=0.0)]
    finally:
        sender.join(10)
        os.close(read_fd)
    assert got == messages
