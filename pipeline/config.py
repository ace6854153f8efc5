"""What a user asks of the pipeline: frozen dataclasses, one per concern, one field per CLI option.

`pipeline.cli.options` defines each option once and names the field it fills (fields are named after
their options, and a name occurs once in any command's config); commands build their config objects
(LaunchConfig in pipeline.cli.launch, BenchConfig, ProfileConfig) from these with
`pipeline.cli.parameters.config_from` and pass them down whole. The scheduler imports this module, so it
holds no ZeroMQ: the liveness settings (LivenessConfig) live with the cluster (pipeline.runtime.cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.protocol.limits import MAX_BRANCHES
from workers.sampling import SamplingParams
from workers.worker_settings import AUTO_DTYPE

MODES = ("overlap", "serial", "target-only")
# How each sequence's window size is chosen (--k-policy): always --k; adapted per sequence between 1 and
# --k (assisted generation's schedule); or by the goodput controller, between 0 and --k (pipeline.algorithm.speculation).
K_POLICIES = ("fixed", "adaptive", "goodput")


def worker_roles(mode: str) -> tuple[str, ...]:
    """The workers a pipeline in `mode` runs: target-only has no draft."""
    return ("target",) if mode == "target-only" else ("draft", "target")


@dataclass(frozen=True)
class DecodeConfig:
    """How sequences are decoded (the scheduler's settings)."""

    mode: str = "overlap"
    k: int = 3
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    # fixed: every window drafts k. adaptive: one longer after a fully accepted window, down to accepted + 1
    # after a rejection (transformers' assisted generation, PEARL's adaptive draft length in spirit).
    # goodput: per step and sequence, 0..k, whatever maximises the batch's expected tokens per second.
    k_policy: str = "goodput"
    # Overlap: at most this many branches (outcomes of a verification) drafted ahead per window;
    # 1 is the classic optimistic pre-draft (all accepted, the bonus guessed by the draft's argmax).
    max_branches: int = 12
    # Sequences decoded at once, at most (each holds a KV slot of the whole context in both workers); the
    # rest wait in order.
    max_seqs: int = 16
    # A prompt is prefilled in chunks of this many tokens, one chunk per target step beside the running
    # sequences' windows, so a long prompt never stalls them for its whole length; 0 = the whole prompt at once.
    prefill_chunk: int = 64

    def slots(self, concurrency: int) -> int:
        """KV slots each worker needs for `concurrency` prompts at once: as many, up to --max-seqs."""
        return max(1, min(concurrency, self.max_seqs))

    def validate(self, max_context: int) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; --mode takes one of {', '.join(MODES)}")
        if not 1 <= self.k < max_context:
            raise ValueError(f"--k must be between 1 and {max_context - 1} (the context), got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.k_policy not in K_POLICIES:
            raise ValueError(f"unknown k policy {self.k_policy!r}; --k-policy takes one of {', '.join(K_POLICIES)}")
        if self.max_seqs < 1:
            raise ValueError(f"--max-seqs must be at least 1, got {self.max_seqs}")
        if self.prefill_chunk < 0:
            raise ValueError(f"--prefill-chunk must be 0 (whole prompts) or a chunk size, got {self.prefill_chunk}")
        if not 1 <= self.max_branches <= MAX_BRANCHES:
            raise ValueError(f"--max-branches must be between 1 and {MAX_BRANCHES}, got {self.max_branches}")
        self.sampling.validate()

    @property
    def roles(self) -> tuple[str, ...]:
        return worker_roles(self.mode)

    @property
    def uses_draft(self) -> bool:
        return "draft" in self.roles


@dataclass(frozen=True)
class ModelsConfig:
    """The draft and target checkpoints (Hugging Face layout); the coordinator tokenizes with the target's."""

    draft_dir: Path = DRAFT_DIR
    target_dir: Path = TARGET_DIR

    def directory(self, role: str) -> Path:
        return self.target_dir if role == "target" else self.draft_dir


@dataclass(frozen=True)
class WorkersConfig:
    """How the workers a coordinator spawns run."""

    backend: str = "torch"
    draft_device: str = "cpu"
    target_device: str = "cpu"
    threads: int = 1  # per worker, unless its role's own count says otherwise
    target_threads: int = 0  # 0 = threads
    draft_threads: int = 0  # 0 = threads
    max_model_len: int = 4096  # positions per sequence's KV slot, cut to each model's context; 0 = its context
    dtype: str = AUTO_DTYPE  # resolved by each worker for its device (workers.worker_settings.resolved_dtype)
    # niceness added to a draft that shares the coordinator's core: 0 = none, no worker below the coordinator
    draft_nice: int = 0

    def device(self, role: str) -> str:
        return self.target_device if role == "target" else self.draft_device

    def threads_of(self, role: str) -> int:
        own = self.target_threads if role == "target" else self.draft_threads
        return own or self.threads


@dataclass(frozen=True)
class RemoteConfig:
    """Workers already running (`specpipe worker`), maybe on other hosts, and the CURVE keys to reach them."""

    target_addr: str = ""  # "" = spawn the target here
    draft_addr: str = ""
    curve_secret_key: str = ""  # this coordinator's key pair (NAME.key_secret)
    target_server_key: str = ""  # the public key of the worker at target_addr
    draft_server_key: str = ""

    @property
    def addresses(self) -> dict[str, str]:
        """role -> address of the workers that run already (not spawned here)."""
        return {role: address for role, address in (("target", self.target_addr), ("draft", self.draft_addr))
                if address}

    @property
    def server_keys(self) -> dict[str, str]:
        """role -> its --ROLE-server-key ("" when not given)."""
        return {"target": self.target_server_key, "draft": self.draft_server_key}


MEASURED_PROMPTS = 8  # bench's and profile's --prompts
WARMUP_PROMPTS = 1  # bench's and profile's --warmup


@dataclass(frozen=True)
class PromptsConfig:
    """Which prompts run: the --prompt texts, then lines of --prompts-file (see pipeline.prompts)."""

    texts: tuple[str, ...] = ()
    file: Path | None = None  # one JSON string per line
    count: int | None = None  # how many lines of the file (after the warm-up ones); None = all of them
    warmup: int = 0  # lines of the file run first and reported apart

    def validate(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"--prompts must be at least 1, got {self.count}")
        if self.warmup < 0:
            raise ValueError(f"--warmup cannot be negative (0 = none), got {self.warmup}")


@dataclass(frozen=True)
class OutputConfig:
    """What `specpipe launch` (and bench-serve) print."""

    json_lines: bool = False  # one JSON object per prompt on stdout instead of the text and a stats line
