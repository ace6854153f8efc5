"""The `specpipe` command line."""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path

import click

from workers.models import DRAFT_DIR, TARGET_DIR

DEFAULT_PROMPT = "def fibonacci(n):\n"


class UserError(click.ClickException):
    """One clear line on stderr and exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"specpipe: error: {self.message}", err=True)


def default_dtype(device: str) -> str:
    from workers.backends.cpu_fp16 import FP16_WEIGHTS, fbgemm_fp16_available

    if device != "cpu":
        return "bfloat16"
    return FP16_WEIGHTS if fbgemm_fp16_available() else "float32"


def read_prompts(prompts: tuple[str, ...], prompts_file: Path | None) -> list[str]:
    texts = list(prompts)
    if prompts_file is not None:
        for number, line in enumerate(prompts_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{prompts_file}:{number} is not a JSON string (--prompts-file wants one per line)")
            if not isinstance(text, str):
                raise UserError(f"{prompts_file}:{number} holds a {type(text).__name__}, not a JSON string")
            texts.append(text)
    return texts or [DEFAULT_PROMPT]


@click.group()
@click.version_option(package_name="specpipe")
def main() -> None:
    """specpipe: speculative decoding with a draft worker and a target worker over ZeroMQ."""


@main.command()
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=DRAFT_DIR, show_default="bundled draft",
              help="Draft checkpoint directory (Hugging Face layout).")
@click.option("--target", "target_dir", type=click.Path(path_type=Path), default=TARGET_DIR,
              show_default="bundled target", help="Target checkpoint directory (Hugging Face layout).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One JSON string per line.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--k", type=int, default=5, show_default=True, help="Drafted tokens per verification.")
@click.option("--mode", type=click.Choice(["overlap", "serial", "target-only"]), default="overlap", show_default=True)
@click.option("--adaptive-k", is_flag=True, help="Adapt each sequence's window between 1 and --k as it goes.")
@click.option("--max-branches", type=int, default=12, show_default=True,
              help="Overlap: at most this many outcomes of a verification drafted ahead at once (1 = only "
                   "'all accepted, bonus guessed'); how many fit is learnt while running.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Prompts decoded at once.")
@click.option("--backend", type=click.Choice(["torch", "ttnn"]), default="torch", show_default=True)
@click.option("--draft-device", default="cpu", show_default=True)
@click.option("--target-device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="CPU threads per worker; each worker is pinned to its own cores when the machine has enough.")
@click.option("--dtype", default="auto", show_default=True,
              help="float32, bfloat16, or fp16-weights (CPU: fp16 weights, fp32 maths, via fbgemm). "
                   "auto = fp16-weights on CPU where fbgemm runs (else float32), bfloat16 on CUDA.")
@click.option("--ready-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the workers to load.")
@click.option("--heartbeat-interval", type=float, default=0.5, show_default=True,
              help="Seconds between heartbeats to each worker (answered by ZeroMQ itself, even mid-forward-pass).")
@click.option("--heartbeat-timeout", type=float, default=2.0, show_default=True,
              help="Seconds of silence after which a worker counts as hung and the launch fails.")
@click.option("--target-addr", default="", metavar="ADDR",
              help="Use the `specpipe worker --role target` already listening at ADDR (tcp://HOST:PORT) instead of "
                   "spawning one; --target then only provides the tokenizer.")
@click.option("--draft-addr", default="", metavar="ADDR", help="Likewise for the draft worker.")
@click.option("--curve-secret-key", default="", metavar="FILE",
              help="This coordinator's CURVE key pair (NAME.key_secret from `specpipe keygen`), for workers given "
                   "by address; needed for any address off this host.")
@click.option("--target-server-key", default="", metavar="FILE",
              help="The public key (NAME.key) of the worker at --target-addr.")
@click.option("--draft-server-key", default="", metavar="FILE",
              help="The public key (NAME.key) of the worker at --draft-addr.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt on stdout.")
def launch(draft_dir, target_dir, prompts, prompts_file, max_new_tokens, k, mode, adaptive_k, max_branches, temperature,
           top_p, top_k,
           seed, concurrency, backend, draft_device, target_device, threads, dtype, ready_timeout, heartbeat_interval,
           heartbeat_timeout, target_addr, draft_addr, curve_secret_key, target_server_key, draft_server_key,
           as_json) -> None:
    """Start the draft and target workers and generate for the prompts."""
    from pipeline.cancellation import CancelOnSignal, interrupt_on_sigterm
    from pipeline.errors import WorkerFailed
    from pipeline.generation import generate
    from pipeline.launcher import ClusterConfig, LocalCluster, default_cores
    from pipeline.liveness import Heartbeats
    from pipeline.preflight import check_checkpoints, check_device, check_dtype, check_prompts, check_settings
    from pipeline.output import ResultPrinter
    from pipeline.remote import check_remote_workers
    from pipeline.config import DecodeConfig
    from workers.errors import SpecpipeError
    from workers.model.checkpoint import load_tokenizer
    from workers.sampling import SamplingParams
    from workers.spec import WorkerSpec

    texts = read_prompts(prompts, prompts_file)
    config = DecodeConfig(mode, k, max_new_tokens, SamplingParams(temperature, top_k, top_p, seed), adaptive_k,
                          max_branches)
    use_draft = mode != "target-only"
    heartbeats = Heartbeats(heartbeat_interval, heartbeat_timeout)
    try:  # everything that can be checked here is, before any process starts
        check_dtype(dtype)
        context = check_checkpoints({"--target": target_dir, **({"--draft": draft_dir} if use_draft else {})})
        check_settings(config, context, concurrency, threads, heartbeats)
        for device, option in ((target_device, "--target-device"), (draft_device, "--draft-device")):
            check_device(backend, device, option)
        tokenizer = load_tokenizer(target_dir)
        prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        check_prompts(texts, prompt_ids, context)
    except (SpecpipeError, ValueError) as error:
        raise UserError(str(error))

    roles = 2 if use_draft else 1
    cores = default_cores(threads, roles) if "cpu" in (draft_device, target_device) else [()] * roles

    def spec(role: str, directory: Path, device: str, pinned: tuple[int, ...]) -> WorkerSpec:
        resolved = dtype if dtype != "auto" else default_dtype(device)
        return WorkerSpec(role, str(directory), bind="", backend=backend, device=device, dtype=resolved,
                          threads=threads, cores=pinned if device == "cpu" else (), slots=max(concurrency, 1))

    cluster_config = ClusterConfig(
        target=spec("target", target_dir, target_device, cores[-1]),
        draft=spec("draft", draft_dir, draft_device, cores[0]) if use_draft else None,
        ready_timeout_s=ready_timeout,
        heartbeat_interval_s=heartbeat_interval,
        heartbeat_timeout_s=heartbeat_timeout,
        target_addr=target_addr,
        draft_addr=draft_addr,
        curve_secret_key=curve_secret_key,
        target_server_key=target_server_key,
        draft_server_key=draft_server_key,
    )
    printer = ResultPrinter(tokenizer, texts, config, as_json, stream=concurrency == 1 and not as_json)
    interrupt_on_sigterm()  # while starting: stop the workers on the way out, like Ctrl-C
    try:
        with LocalCluster(cluster_config) as cluster:
            check_remote_workers(cluster.ready, cluster.remote, str(target_dir), concurrency)
            with CancelOnSignal() as cancel:
                sequences, engine = generate(cluster.transport, prompt_ids, config, cluster.limits(), concurrency,
                                             on_tokens=printer.on_tokens, stop=cancel.requested)
            printer.finish(sequences)
    except (SpecpipeError, ValueError, TimeoutError) as error:
        raise UserError(str(error))
    except (WorkerFailed, RuntimeError) as error:
        raise click.ClickException(str(error))
    except KeyboardInterrupt:
        click.echo("specpipe: interrupted; workers stopped", err=True)
        raise click.exceptions.Exit(130)
    if cancel.signum is not None:
        name = signal.Signals(cancel.signum).name
        click.echo(f"[coord] cancelled by {name}: kept what was generated, freed the workers' KV slots", err=True)
        raise click.exceptions.Exit(128 + cancel.signum)


@main.command()
@click.option("--role", type=click.Choice(["draft", "target"]), required=True)
@click.option("--checkpoint", required=True, help="Checkpoint directory (Hugging Face layout).")
@click.option("--bind", required=True, help="ZeroMQ address to listen on, e.g. ipc:///tmp/w.sock or tcp://127.0.0.1:5555.")
@click.option("--backend", type=click.Choice(["torch", "ttnn"]), default="torch", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--cores", default="", help="Comma-separated CPU cores to pin to.")
@click.option("--io-cores", default="", help="Comma-separated CPU cores for ZeroMQ's I/O threads (default: with the "
                                              "rest); launch puts a pinned target's on the coordinator's cores.")
@click.option("--slots", type=int, default=8, show_default=True, help="Sequences held at once.")
@click.option("--max-seq-len", type=int, default=0, show_default=True, help="0 = the model's context.")
@click.option("--spin-ms", type=float, default=0.0, show_default=True,
              help="Busy-poll this long for the next request before sleeping (only on a core of its own).")
@click.option("--nice", type=int, default=0, show_default=True,
              help="Niceness to add (yield the core to others); a worker that leads its session, as launch starts "
                   "them, nices the session too (autogroup scheduling shares a core between sessions by theirs).")
@click.option("--parent-pid", type=int, default=0, show_default=True,
              help="Exit when this process is gone (set by launch for the workers it spawns); 0 = never.")
@click.option("--curve-secret-key", default="", metavar="FILE",
              help="This worker's CURVE key pair (NAME.key_secret from `specpipe keygen`): encrypt and authenticate "
                   "every connection. Without it the worker binds only loopback or ipc://.")
@click.option("--curve-clients", multiple=True, metavar="PATH",
              help="Public key file (NAME.key) of a coordinator allowed to connect, or a directory of them; repeat "
                   "for several. Every other client is refused.")
def worker(role, checkpoint, bind, backend, device, dtype, threads, cores, io_cores, slots, max_seq_len, spin_ms,
           nice, parent_pid, curve_secret_key, curve_clients) -> None:
    """Run one worker process (started by `launch`, or by hand on another host)."""
    from workers.server import serve
    from workers.spec import WorkerSpec

    def core_list(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in text.split(",") if c.strip())
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a comma-separated list of core numbers") from None

    spec = WorkerSpec(role, checkpoint, bind, backend, device, dtype, threads, core_list(cores), core_list(io_cores),
                      slots, max_seq_len, spin_ms, nice, parent_pid, curve_secret_key, tuple(curve_clients))
    sys.exit(serve(spec))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Base name: writes DIRECTORY/NAME.key (public) and NAME.key_secret.")
def keygen(directory, name) -> None:
    """Write a CURVE key pair for a worker or a coordinator.

    Give NAME.key (the public key) to the other side: a worker's to `launch --target-server-key` or
    `--draft-server-key`, a coordinator's to `worker --curve-clients`. Keep NAME.key_secret to yourself.
    """
    from workers.curve import keygen as write_key_pair
    from workers.errors import SpecpipeError

    try:
        public, secret = write_key_pair(directory, name)
    except SpecpipeError as error:
        raise UserError(str(error))
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it on this host)")


def _counts(context, parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers, e.g. 2,4,8")


@main.command()
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=DRAFT_DIR, show_default="bundled draft")
@click.option("--target", "target_dir", type=click.Path(path_type=Path), default=TARGET_DIR,
              show_default="bundled target")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="One JSON string per line.  [default: the bundled held-out code prompts]")
@click.option("--prompts", type=int, default=8, show_default=True, help="How many prompts of the file to measure.")
@click.option("--k", "ks", default="2,3,5", show_default=True, callback=_counts,
              help="Window sizes for serial and overlap, comma-separated.")
@click.option("--max-branches", "max_branches", default="12", show_default=True, callback=_counts,
              help="Overlap: outcomes drafted ahead at most (as for launch); a list runs overlap once per value.")
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--repetitions", type=int, default=1, show_default=True, help="Passes over the prompts.")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Prompts run first in every configuration and reported apart.")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Also run transformers generate and assisted generation on the same models.")
@click.option("--dtype", default="auto", show_default=True, help="Our workers' --dtype (float32 = transformers' math).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every figure here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write a Markdown report with PNG plots into this directory.")
def bench(draft_dir, target_dir, prompts_file, prompts, ks, max_branches, new_tokens, repetitions, warmup, peers, dtype,
          json_path, report_dir) -> None:
    """Measure target-only, serial and overlap against transformers, on the same models and machine.

    Wall-clock tokens/s per configuration, one prompt at a time, configurations interleaved prompt by
    prompt; speedups next to what theory predicts from the measured acceptance and step costs; a check
    that every greedy output is token-identical.
    """
    from pipeline.bench.config import BenchConfig
    from pipeline.bench.report import describe, text_table, write_json, write_report
    from pipeline.bench.run import run_bench
    from pipeline.preflight import check_checkpoints, check_dtype
    from workers.errors import SpecpipeError
    from workers.models import HELDOUT_PROMPTS

    config = BenchConfig(draft_dir, target_dir, prompts_file or HELDOUT_PROMPTS, prompts, ks, max_branches, new_tokens,
                         repetitions, warmup, peers, dtype, json_path, report_dir)
    try:
        config.validate()
        check_dtype(dtype)
        check_checkpoints({"--target": target_dir, "--draft": draft_dir})
    except (SpecpipeError, ValueError) as error:
        raise UserError(str(error))
    resolved = default_dtype("cpu") if dtype == "auto" else dtype
    command = "specpipe bench " + " ".join(sys.argv[2:])
    try:
        result = run_bench(config, resolved, command)
    except (SpecpipeError, ValueError) as error:
        raise UserError(str(error))
    click.echo(text_table(result))
    for line in describe(result):
        click.echo(line)
    if json_path is not None:
        write_json(result, json_path)
        click.echo(f"figures: {json_path}")
    if report_dir is not None:
        try:
            written = write_report(result, report_dir)
        except ValueError as error:
            raise UserError(str(error))
        click.echo(f"report: {written[0]} (+{len(written) - 1} plots)")


@main.command()
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=DRAFT_DIR, show_default="bundled draft")
@click.option("--target", "target_dir", type=click.Path(path_type=Path), default=TARGET_DIR,
              show_default="bundled target")
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for several.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="One JSON string per line.  [default: the first --prompts of the bundled held-out code prompts]")
@click.option("--prompts", "prompt_count", type=int, default=4, show_default=True,
              help="How many prompts of the bundled set to run when neither --prompt nor --prompts-file is given.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--k", type=int, default=3, show_default=True, help="Drafted tokens per verification.")
@click.option("--mode", type=click.Choice(["overlap", "serial", "target-only"]), default="overlap", show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Prompts decoded at once.")
@click.option("--dtype", default="auto", show_default=True, help="As for launch.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("specpipe-trace.json"),
              show_default=True, help="Where to write the Chrome / Perfetto trace (trace-event JSON).")
@click.option("--max-spans", type=int, default=400_000, show_default=True, help="Spans kept per process.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run a short untraced generation first (reported apart).")
def profile(draft_dir, target_dir, prompts, prompts_file, prompt_count, max_new_tokens, k, mode, concurrency, dtype,
            trace_path, max_spans, warmup) -> None:
    """Trace one prompt set through the pipeline: a span for every draft, verification, send, receive and
    wait in every process, on one clock; writes --trace and prints where the time went."""
    from pipeline.errors import WorkerFailed
    from pipeline.preflight import check_checkpoints, check_dtype
    from pipeline.profile import ProfileConfig, run_profile, summary_lines
    from pipeline.config import DecodeConfig
    from workers.errors import SpecpipeError
    from workers.models import HELDOUT_PROMPTS

    texts = list(prompts) or (read_prompts((), prompts_file) if prompts_file else
                              [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:prompt_count]])
    config = ProfileConfig(draft_dir, target_dir, tuple(texts), DecodeConfig(mode, k, max_new_tokens), trace_path,
                           default_dtype("cpu") if dtype == "auto" else dtype, concurrency, max_spans, warmup)
    try:
        check_dtype(dtype)
        check_checkpoints({"--target": target_dir, **({"--draft": draft_dir} if mode != "target-only" else {})})
        config.validate()
        result = run_profile(config)
    except (SpecpipeError, ValueError, TimeoutError) as error:
        raise UserError(str(error))
    except (WorkerFailed, RuntimeError) as error:
        raise click.ClickException(str(error))
    for line in summary_lines(result, trace_path):
        click.echo(line)


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
