"""The worker process stops on SIGTERM whichever of its threads the kernel hands the signal to."""

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from workers.bundled import DRAFT_DIR
from workers.protocol.codec import decode, encode
from workers.protocol.messages import DraftRequest, DraftResult, Hello, Ready


def ask(socket: zmq.Socket, message: object) -> object:
    socket.send(encode(message))
    assert socket.poll(120_000), "no reply"
    return decode(socket.recv())


def signal_unblocking_threads(pid: int) -> list[int]:
    """Thread ids of `pid` other than the main one that do not block SIGTERM (libzmq's own threads do)."""
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        if int(task.name) != pid and not blocked & (1 << (signal.SIGTERM - 1)):
            tids.append(int(task.name))
    return tids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread-directed signals via tgkill (Linux)")
def test_sigterm_taken_by_a_helper_thread_still_stops_the_worker(tmp_path):
    address = f"ipc://{tmp_path}/draft.sock"
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "worker", "--role", "draft", "--checkpoint",
                               str(DRAFT_DIR), "--bind", address, "--slots", "1", "--max-seq-len", "64"],
                              stdin=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"))
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(address)
        assert isinstance(ask(socket, Hello(1)), Ready)
        assert isinstance(ask(socket, DraftRequest(1, 0, 0, [1, 2, 3], 2)), DraftResult)
        time.sleep(0.2)  # past its spin: the main thread now blocks in zmq_poll
        helpers = signal_unblocking_threads(worker.pid)
        assert helpers, "expected the connection-log thread"
        # what a process-directed SIGTERM may become: a signal that one helper thread takes
        assert ctypes.CDLL(None, use_errno=True).tgkill(worker.pid, helpers[0], signal.SIGTERM) == 0
        assert worker.wait(10) == 0
    finally:
        socket.close(0)
        context.term()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
