"""What one generation of one prompt left behind, from our pipeline or from a peer, in one shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.critical_path import TargetTimeSplit
from pipeline.engine import Engine, Trip
from pipeline.scheduler import Sequence


@dataclass
class Generation:
    token_ids: list[int]
    wall_s: float  # from the request to the last token
    token_times: list[float]  # seconds from the request to each token's commit (tokens committed together share one)
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0  # verifications that carried drafted tokens
    accepted_lengths: list[int] = field(default_factory=list)
    window_sizes: list[int] = field(default_factory=list)
    predraft_hits: int = 0
    predraft_misses: int = 0
    speculated_branches: list[int] = field(default_factory=list)  # overlap: outcomes drafted ahead, per verification
    # seconds per process: busy (computing), ipc (round trip minus compute); the coordinator's own work
    busy_s: dict[str, float] = field(default_factory=dict)
    ipc_s: dict[str, float] = field(default_factory=dict)
    coordinator_s: float = 0.0
    trips: list[Trip] = field(default_factory=list)
    target_split: TargetTimeSplit | None = None  # the target's wall, bucketed (ours only)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0]


def from_pipeline(sequence: Sequence, engine: Engine, wall_s: float,
                  target_split: TargetTimeSplit | None = None) -> Generation:
    stats = sequence.stats
    return Generation(
        token_ids=list(sequence.generated),
        wall_s=wall_s,
        token_times=[t - stats.started for t in stats.token_times],
        drafted=stats.drafted,
        accepted=stats.accepted,
        verifications=stats.verifications,
        accepted_lengths=list(stats.accepted_lengths),
        window_sizes=list(stats.window_sizes),
        predraft_hits=stats.predraft_hits,
        predraft_misses=stats.predraft_misses,
        speculated_branches=list(stats.speculated_branches),
        busy_s=dict(engine.busy_s),
        ipc_s=dict(engine.overhead_s),
        coordinator_s=engine.coordinator_s,
        trips=list(engine.trips),
        target_split=target_split,
    )
