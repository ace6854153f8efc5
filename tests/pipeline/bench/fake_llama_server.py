"""Stands in for llama-server in the tests: answers /health and replays a recorded /completion stream.

    fake_llama_server.py [llama-server's options] --port N      (FAKE_LLAMA_SSE: the recording to replay;
                                                                  FAKE_LLAMA_LOG: where requests and argv go)
"""

from __future__ import annotations

import json
import os
import stat
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RECORDINGS = Path(__file__).with_name("data")


def install(root: Path, checkpoints: list[Path] = ()) -> dict[str, str]:
    """Makes `root` look like scripts/build_llama_cpp.py's output with this stand-in as its llama-server (and
    placeholder GGUFs of `checkpoints`); returns the environment the stand-in reads (replaying the k=3
    speculative recording, logging to root/requests.jsonl)."""
    from pipeline.bench.llama_cpp import LlamaCppBuild

    build = LlamaCppBuild(root)
    build.bin_dir.mkdir(parents=True, exist_ok=True)
    build.server.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    build.server.chmod(build.server.stat().st_mode | stat.S_IEXEC)
    for checkpoint in checkpoints:
        build.gguf(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        build.gguf(checkpoint).write_bytes(b"GGUF")
    return {"FAKE_LLAMA_SSE": str(RECORDINGS / "llama_server_spec_k3.sse"), "FAKE_LLAMA_LOG": str(root / "requests.jsonl")}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(os.environ["FAKE_LLAMA_LOG"], "a") as log:
            log.write(json.dumps({"request": body}) + "\n")
        if not (isinstance(body.get("prompt"), list) and body.get("stream") and body.get("return_tokens")):
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        with open(os.environ["FAKE_LLAMA_SSE"], "rb") as recording:
            for line in recording:
                self.wfile.write(line)
                self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    if "--version" in sys.argv:
        print("version: 0.5.0-fake (build 1, commit 0000000)")
        return
    with open(os.environ["FAKE_LLAMA_LOG"], "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "cores": sorted(os.sched_getaffinity(0))}) + "\n")
    port = int(sys.argv[sys.argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
