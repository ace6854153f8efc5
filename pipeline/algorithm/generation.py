"""Running a set of prompts through a transport: the one entry point the CLI, bench and tests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.algorithm.engine import Engine, Transport
from pipeline.algorithm.scheduler import Scheduler, Sequence
from pipeline.config import DecodeConfig
from workers.spans import SpanRecorder


@dataclass(frozen=True)
class ModelLimits:
    """What the coordinator must know of the models (from the workers' READY messages)."""

    vocab_size: int
    eos_ids: frozenset[int]
    max_context: int  # the smaller of the two models' contexts


def generate(
    transport: Transport,
    prompts: list[list[int]],
    config: DecodeConfig,
    limits: ModelLimits,
    concurrency: int = 1,
    on_tokens: Callable[[Sequence, list[int]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    spans: SpanRecorder | None = None,
    on_event: Callable[[str], None] | None = None,
) -> tuple[list[Sequence], Engine]:
    """Generates for every prompt; returns the sequences in prompt order and the engine (for its timings).

    When `stop()` turns True the generation is cancelled: unfinished sequences end with finish_reason
    "cancelled", holding what was generated so far, and both workers have freed their slots.
    `spans`, when started, records the coordinator's side of the run (see `specpipe profile`); `on_event` gets
    a line each time the goodput controller switches speculation off or on."""
    config.validate(limits.max_context)
    scheduler = Scheduler(config, limits.vocab_size, set(limits.eos_ids), limits.max_context, concurrency, on_tokens,
                          on_event=on_event)
    sequences = [scheduler.add(seq_id, prompt) for seq_id, prompt in enumerate(prompts)]
    engine = Engine(scheduler, transport, stop=stop, spans=spans)
    engine.run()
    return sequences, engine
