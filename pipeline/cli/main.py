"""The `specpipe` command line: each command turns its options (pipeline.cli.options) into a config and runs it."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import click

from pipeline.cli import options
from pipeline.cli.parameters import config_from
from pipeline.cli.usage_errors import OneLineErrorsGroup, reported_errors


@click.group(cls=OneLineErrorsGroup)
@click.version_option(package_name="specpipe")
def main() -> None:
    """specpipe: speculative decoding with a draft worker and a target worker over ZeroMQ."""


@main.command()
@options.launch_options
def launch(**values) -> None:
    """Start the draft and target workers and generate for the prompts."""
    from pipeline.cli.launch import LaunchConfig, run_launch

    config = config_from(LaunchConfig, values)
    with reported_errors():
        status = run_launch(config)
    if status:
        raise click.exceptions.Exit(status)


@main.command()
@options.worker_options
def worker(**values) -> None:
    """Run one worker process (started by `launch`, or by hand on another host)."""
    from workers.server import serve
    from workers.worker_settings import WorkerSettings

    sys.exit(serve(config_from(WorkerSettings, values)))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@options.KEY_NAME
def keygen(directory: Path, name: str) -> None:
    """Write a CURVE key pair for a worker or a coordinator.

    Give NAME.key (the public key) to the other side: a worker's to `launch --target-server-key` or
    `--draft-server-key`, a coordinator's to `worker --curve-clients`. Keep NAME.key_secret to yourself.
    """
    from workers.curve import keygen as write_key_pair

    with reported_errors():
        public, secret = write_key_pair(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it on this host)")


@main.command()
@options.bench_options
def bench(**values) -> None:
    """Measure target-only, serial and overlap against transformers, on the same models and machine.

    Wall-clock tokens/s per configuration, one prompt at a time, configurations interleaved prompt by
    prompt; speedups next to what theory predicts from the measured acceptance and step costs; a check
    that every greedy output is token-identical.
    """
    from pipeline.bench.command import run_bench_command
    from pipeline.bench.config import BenchConfig

    config = config_from(BenchConfig, values)
    with reported_errors():
        run_bench_command(config, "specpipe bench " + " ".join(sys.argv[2:]))


@main.command()
@options.profile_options
def profile(**values) -> None:
    """Trace one prompt set through the pipeline: a span for every draft, verification, send, receive and
    wait in every process, on one clock; writes --trace and prints where the time went."""
    from pipeline.cli.profile import ProfileConfig, run_profile_command

    config = config_from(ProfileConfig, values)
    with reported_errors():
        run_profile_command(config)


@main.command()
@options.serve_options
def serve(**values) -> None:
    """Serve the pipeline over an OpenAI-compatible HTTP API (completions, chat, models, /health, /metrics).

    Any OpenAI client gets speculative decoding without knowing it is there. SIGTERM or Ctrl-C drains
    (--drain-timeout); a worker that dies ends the requests in flight with an error and the server with
    exit status 1, for a supervisor to restart.
    """
    from pipeline.serving.command import run_serve
    from pipeline.serving.config import ServeConfig

    config = config_from(ServeConfig, values)
    with reported_errors():
        status = run_serve(config)
    if status:
        raise click.exceptions.Exit(status)


@main.command("bench-serve")
@options.bench_serve_options
def bench_serve(**values) -> None:
    """Load a running `specpipe serve` (or any OpenAI-compatible server) with streaming requests.

    Request and token throughput, time to first token, inter-token and end-to-end latency (p50, p90, p99),
    errors, and the acceptance figures of the server's /metrics, as vLLM's serving benchmark reports them.
    """
    from pipeline.serving.config import BenchServeConfig
    from pipeline.serving.load import run_bench_serve

    config = config_from(BenchServeConfig, values)
    with reported_errors():
        status = run_bench_serve(config)
    if status:
        raise click.exceptions.Exit(status)


@main.command()
@options.distill_options
def distill(**values) -> None:
    """Distil a draft for any Llama-family target, then measure the pair.

    A small decoder with the target's tokenizer learns the target's next-token distributions (forward KL)
    over --corpus and over continuations the target writes itself; resumable (rerun with the same --out),
    on CUDA where there is one. At the end: greedy agreement, mean acceptance length at each --eval-k and the
    draft's decode cost against the target's, on --prompts-file (default: the bundled held-out code prompts).
    """
    from pipeline.distill.command import run_distill
    from pipeline.distill.config import DistillConfig

    config = config_from(DistillConfig, values)
    with reported_errors():
        status = run_distill(config)
    if status:
        raise click.exceptions.Exit(status)


def run() -> None:
    """The console entry point: `main`, then an exit that skips the interpreter's teardown.

    With torch and a tokenizer loaded, freeing every module one by one takes 0.5-1 s per process, which a
    launch paid three times in a row on its way out (twice for its workers) and a Ctrl-C had to wait for.
    Exit handlers still run (they close a ttnn device) and the standard streams are flushed; every file
    we write is closed by then."""
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run()
