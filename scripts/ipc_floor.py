"""The transport's floor: a small request's round trip over ZeroMQ against a raw Unix socket.

    python scripts/ipc_floor.py [--requests 300] [--work-ms 4]

Two processes, pinned to cores 0 and 1 with every thread (as `launch` pins the coordinator and the
target), both busy-polling. The client sends 100 bytes, the server spins --work-ms (a stand-in for a
verification, so that the round trip is measured as the pipeline pays it: after a pause) and sends
them back. Printed: the round trip less the work, median and p90, for ZeroMQ DEALER/ROUTER over ipc://
with the server's ZeroMQ threads on its own core and on the client's (what `--io-cores` does), and for
a SOCK_SEQPACKET Unix socket. No ZeroMQ I/O thread sits in the raw path, so the gap is what ZeroMQ's
threads and their wake-ups cost on this machine. Timings depend on the machine; state it with them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time

import zmq

from workers.backends.torch_device import pin_thread_ids, pin_threads, running_threads

PAYLOAD = b"x" * 100


def spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def zmq_server(address: str, work_s: float, io_core: int | None) -> None:
    context = zmq.Context()
    before = running_threads()
    server = context.socket(zmq.ROUTER)
    zmq_threads = running_threads() - before  # the context's I/O and reaper threads
    server.bind(address)
    pin_threads({1})
    if io_core is not None:
        pin_thread_ids(zmq_threads, {io_core})
    while True:
        while not server.poll(0):
            pass
        identity, message = server.recv_multipart()
        if message == b"stop":
            break
        spin(work_s)
        server.send_multipart([identity, message])
    server.close(0)
    context.term()


def zmq_round_trips(address: str, requests: int, work_s: float, io_core: int | None) -> list[float]:
    server = multiprocessing.Process(target=zmq_server, args=(address, work_s, io_core))
    server.start()
    context = zmq.Context()
    client = context.socket(zmq.DEALER)
    client.connect(address)
    pin_threads({0})
    trips = []
    for _ in range(requests):
        began = time.perf_counter()
        client.send(PAYLOAD)
        while not client.poll(0):
            pass
        client.recv()
        trips.append(time.perf_counter() - began - work_s)
    client.send(b"stop")
    server.join()
    client.close(0)
    context.term()
    return trips


def raw_server(path: str, work_s: float) -> None:
    pin_threads({1})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    connection, _ = listener.accept()
    connection.setblocking(False)
    while True:
        while True:
            try:
                message = connection.recv(65536)
                break
            except BlockingIOError:
                pass
        if message == b"stop":
            break
        spin(work_s)
        connection.send(message)


def raw_round_trips(path: str, requests: int, work_s: float) -> list[float]:
    server = multiprocessing.Process(target=raw_server, args=(path, work_s))
    server.start()
    pin_threads({0})
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for _ in range(100):
        try:
            client.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)
    client.setblocking(False)
    trips = []
    for _ in range(requests):
        began = time.perf_counter()
        client.send(PAYLOAD)
        while True:
            try:
                client.recv(65536)
                break
            except BlockingIOError:
                pass
        trips.append(time.perf_counter() - began - work_s)
    client.send(b"stop")
    server.join()
    return trips


def describe(name: str, trips: list[float]) -> str:
    kept = sorted(trips[len(trips) // 10 :])  # the first tenth warms up
    p90 = kept[int(0.9 * (len(kept) - 1))]
    return f"{name:<44} median {statistics.median(kept) * 1e6:6.0f} µs   p90 {p90 * 1e6:6.0f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--work-ms", type=float, default=4.0)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("needs cores 0 and 1")
    work_s = args.work_ms / 1000
    with tempfile.TemporaryDirectory() as directory:
        print(describe("ZeroMQ ipc, server's I/O thread on its core",
                       zmq_round_trips(f"ipc://{directory}/a.sock", args.requests, work_s, None)))
        print(describe("ZeroMQ ipc, server's I/O thread on client's",
                       zmq_round_trips(f"ipc://{directory}/b.sock", args.requests, work_s, 0)))
        print(describe("Unix SOCK_SEQPACKET, no I/O threads",
                       raw_round_trips(f"{directory}/c.sock", args.requests, work_s)))


if __name__ == "__main__":
    main()
