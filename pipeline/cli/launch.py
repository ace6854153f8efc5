"""`specpipe launch`: check what was asked, start the workers, generate for the prompts, print the results."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

from pipeline.algorithm.generation import generate
from pipeline.algorithm.sequence import Sequence
from pipeline.cli.launch_output import ResultPrinter
from pipeline.config import DecodeConfig, ModelsConfig, OutputConfig, PromptsConfig, RemoteConfig, WorkersConfig
from pipeline.prompts import encode_prompt, select_prompts
from pipeline.runtime.cancellation import CancelOnSignal, interrupt_on_sigterm
from pipeline.runtime.cluster import LivenessConfig, LocalCluster, cluster_config, log
from pipeline.runtime.preflight import check_checkpoints, check_prompts, check_settings, check_workers
from pipeline.runtime.remote_workers import check_remote_workers
from workers.model.checkpoint import load_tokenizer

DEFAULT_PROMPT = "def fibonacci(n):\n"  # when neither --prompt nor --prompts-file gives one


@dataclass(frozen=True)
class LaunchConfig:
    """Everything `specpipe launch` is asked for."""

    models: ModelsConfig = ModelsConfig()
    prompts: PromptsConfig = PromptsConfig()
    decode: DecodeConfig = DecodeConfig()
    concurrency: int = 1  # prompts decoded at once
    workers: WorkersConfig = WorkersConfig()
    liveness: LivenessConfig = LivenessConfig()
    remote: RemoteConfig = RemoteConfig()
    output: OutputConfig = OutputConfig()


def run_launch(config: LaunchConfig) -> int:
    """Generates for the prompts; returns the exit status (0, or 128 + the signal that cancelled it).

    Bad input raises ValueError (or SpecpipeError, TimeoutError) before any process starts, or once the
    workers say what they run; a worker that fails while running raises WorkerFailed."""
    decode, models = config.decode, config.models
    texts = select_prompts(config.prompts).measured or [DEFAULT_PROMPT]
    # everything that can be checked here is, before any process starts
    check_workers(config.workers)
    context = check_checkpoints(models, decode.uses_draft)
    check_settings(decode, context, config.concurrency)
    config.liveness.heartbeats.validate()
    tokenizer = load_tokenizer(models.target_dir)
    prompt_ids = [encode_prompt(tokenizer, text) for text in texts]
    check_prompts(texts, prompt_ids, context)

    workers = cluster_config(models, config.workers, decode.mode, decode.slots(config.concurrency), config.liveness,
                             config.remote)
    json_lines = config.output.json_lines
    printer = ResultPrinter(tokenizer, texts, decode, json_lines, stream=config.concurrency == 1 and not json_lines)
    interrupt_on_sigterm()  # while starting: stop the workers on the way out, like Ctrl-C
    try:
        with LocalCluster(workers) as cluster:
            check_remote_workers(cluster.ready, cluster.remote, str(models.target_dir),
                                 decode.slots(config.concurrency))
            with CancelOnSignal() as cancel:
                began = time.perf_counter()
                sequences, _ = generate(cluster.transport, prompt_ids, decode, cluster.limits(), config.concurrency,
                                        on_tokens=printer.on_tokens, stop=cancel.requested, on_event=log)
                wall_s = time.perf_counter() - began
            printer.finish(sequences)
            log(throughput_line(sequences, wall_s, config.concurrency))
    except KeyboardInterrupt:
        print("specpipe: interrupted; workers stopped", file=sys.stderr, flush=True)
        return 130
    if cancel.signum is None:
        return 0
    name = signal.Signals(cancel.signum).name
    print(f"[coord] cancelled by {name}: kept what was generated, freed the workers' KV slots", file=sys.stderr,
          flush=True)
    return 128 + cancel.signum


def throughput_line(sequences: list[Sequence], wall_s: float, concurrency: int) -> str:
    """The run's tokens/s, the workers' start-up left out: every new token over the wall from the first prompt's
    admission to the last token (what bench's tokens/s is, for one round)."""
    tokens = sum(len(sequence.generated) for sequence in sequences)
    return (f"{len(sequences)} prompt(s), {tokens} new tokens in {wall_s:.2f} s: {tokens / max(wall_s, 1e-9):.1f} "
            f"tokens/s at concurrency {concurrency}")
