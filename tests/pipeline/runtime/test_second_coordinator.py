"""Two coordinators at one worker: the second is told the worker is busy instead of wiping the first's work.

That a coordinator silent for OWNER_QUIET_S is replaced is tests/workers/test_owner.py's, on an injected clock.
"""

import subprocess
import sys

import pytest
import zmq

from workers.bundled import DRAFT_DIR
from workers.protocol.codec import decode, encode
from workers.protocol.messages import DraftRequest, DraftResult, ErrorReply, Hello, Ready, Release, Released, Shutdown


def ask(socket: zmq.Socket, message: object, timeout_ms: int = 120_000) -> object:
    socket.send(encode(message))
    assert socket.poll(timeout_ms), "no reply"
    return decode(socket.recv())


@pytest.mark.slow
def test_second_coordinator_is_refused_until_the_first_is_done(tmp_path):
    address = f"ipc://{tmp_path}/draft.sock"
    worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "worker", "--role", "draft", "--checkpoint",
                               str(DRAFT_DIR), "--bind", address, "--slots", "2", "--max-seq-len", "256"],
                              stdin=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"))
    context = zmq.Context()
    first, second = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    try:
        for socket in (first, second):
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
        assert isinstance(ask(first, Hello(101)), Ready)
        assert isinstance(ask(first, DraftRequest(1, 0, 0, [1, 2, 3], 2)), DraftResult)  # holds sequence 0

        refused = ask(second, Hello(202))
        assert isinstance(refused, ErrorReply) and not refused.fatal
        assert "in use by another coordinator (pid 101, 1 sequence(s)" in refused.message
        for stranger_request in (DraftRequest(9, 0, 0, [9], 1), Release(0)):  # nor may it touch the first's work
            refused = ask(second, stranger_request)
            assert isinstance(refused, ErrorReply) and "serves another coordinator (pid 101)" in refused.message
        second.send(encode(Shutdown("not yours")))
        assert second.poll(10_000) and "in use by another coordinator" in decode(second.recv()).message
        # the worker is still up and the first coordinator's sequence survived: it continues where it was
        assert ask(first, DraftRequest(2, 0, 4, [4], 1)).cached == 5

        assert ask(first, Release(0)) == Released(0, 0)
        assert isinstance(ask(second, Hello(202)), Ready)  # nothing held any more

        assert isinstance(ask(second, DraftRequest(3, 1, 0, [1, 2], 1)), DraftResult)  # now it holds one
        refused = ask(first, Hello(101))  # the roles swapped: now the first one waits
        assert isinstance(refused, ErrorReply)
        assert "in use by another coordinator (pid 202, 1 sequence(s)" in refused.message
        assert ask(second, Release(1)) == Released(1, 0)  # the worker served on through every refusal
        log = (tmp_path / "worker.log").read_text()
        assert "refused a Hello from a second coordinator" in log and "refused a Shutdown" in log
    finally:
        first.close(0)
        second.close(0)
        context.term()
        worker.terminate()
        try:
            assert worker.wait(10) == 0, "the worker did not stop on SIGTERM"
        finally:
            if worker.poll() is None:
                worker.kill()  # never leave it behind for the tests that follow
                worker.wait()
