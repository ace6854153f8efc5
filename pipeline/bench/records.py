"""What one round of generations left behind, from our pipeline or from a peer, in one shape.

A round is one call that decodes c prompts at once (c = the concurrency; 1 prompt at concurrency 1). What
describes one sequence is in its Generation; what describes the whole engine during the round (its wall,
each process's busy and IPC time, the round trips, the target's time split, the goodput controller's
summary) is in the Round, once, so that figures never count it once per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.algorithm.engine import Engine, Trip
from pipeline.algorithm.scheduler import Sequence
from pipeline.runtime.critical_path import TargetTimeSplit


@dataclass
class Generation:
    """One sequence of a round."""

    token_ids: list[int]
    wall_s: float  # from the sequence's start (its admission) to its last token
    token_times: list[float]  # seconds from the sequence's start to each token's commit (tokens committed together share one)
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0  # verifications that carried drafted tokens
    plain_steps: int = 0  # target steps after the prefill that carried no drafted token
    accepted_lengths: list[int] = field(default_factory=list)
    window_sizes: list[int] = field(default_factory=list)
    predraft_hits: int = 0
    predraft_misses: int = 0
    speculated_branches: list[int] = field(default_factory=list)  # overlap: outcomes drafted ahead, per verification

    @property
    def ttft_s(self) -> float:
        return self.token_times[0]


@dataclass
class Round:
    """One call that generated for `len(generations)` prompts at once."""

    generations: list[Generation]  # in prompt order
    wall_s: float  # from the call to its return: every sequence of the round done
    prompts: list[int] = field(default_factory=list)  # the measured prompts' indices, one per generation
    # seconds per process: busy (computing), ipc (round trip minus compute); the coordinator's own work
    busy_s: dict[str, float] = field(default_factory=dict)
    ipc_s: dict[str, float] = field(default_factory=dict)
    coordinator_s: float = 0.0
    trips: list[Trip] = field(default_factory=list)
    target_split: TargetTimeSplit | None = None  # the target's wall, bucketed (ours only)
    speculation: dict = field(default_factory=dict)  # the goodput controller's summary, where the scheduler has one


def one(generation: Generation, wall_s: float | None = None, **engine) -> Round:
    """A round of one generation (concurrency 1); its wall is the generation's unless given."""
    return Round([generation], generation.wall_s if wall_s is None else wall_s, **engine)


def from_sequence(sequence: Sequence) -> Generation:
    stats = sequence.stats
    times = [t - stats.started for t in stats.token_times]
    end = stats.finished_at if stats.finished_at is not None else (stats.token_times or [stats.started])[-1]
    return Generation(
        token_ids=list(sequence.generated),
        wall_s=end - stats.started,
        token_times=times,
        drafted=stats.drafted,
        accepted=stats.accepted,
        verifications=stats.verifications,
        plain_steps=getattr(stats, "plain_steps", 0),
        accepted_lengths=list(stats.accepted_lengths),
        window_sizes=list(stats.window_sizes),
        predraft_hits=stats.predraft_hits,
        predraft_misses=stats.predraft_misses,
        speculated_branches=list(stats.speculated_branches),
    )


def controller_summary(engine: Engine) -> dict:
    """The goodput controller's summary of the run, where the scheduler keeps one ({} otherwise)."""
    summary = getattr(engine.scheduler, "controller_summary", None)
    return dict(summary() or {}) if callable(summary) else {}


def from_pipeline(sequences: list[Sequence], engine: Engine, wall_s: float, prompts: list[int] | None = None,
                  target_split: TargetTimeSplit | None = None) -> Round:
    return Round(
        generations=[from_sequence(sequence) for sequence in sequences],
        wall_s=wall_s,
        prompts=list(prompts) if prompts is not None else list(range(len(sequences))),
        busy_s=dict(engine.busy_s),
        ipc_s=dict(engine.overhead_s),
        coordinator_s=engine.coordinator_s,
        trips=list(engine.trips),
        target_split=target_split,
        speculation=controller_summary(engine),
    )
