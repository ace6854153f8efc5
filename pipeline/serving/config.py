"""What `specpipe serve` and `specpipe bench-serve` are asked for: frozen dataclasses, one per concern.

Imports nothing heavy: the CLI builds these before it decides to start a server."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import (
    WARMUP_PROMPTS,
    DecodeConfig,
    ModelsConfig,
    OutputConfig,
    PromptsConfig,
    RemoteConfig,
    WorkersConfig,
)
from pipeline.runtime.cluster import LivenessConfig
from workers.sampling import SamplingParams

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_VARIABLE = "SPECPIPE_API_KEY"  # serve's key when neither --api-key nor --api-key-file gives one


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP side of `specpipe serve`."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str = ""  # "" = no key asked for (unless api_key_file or $SPECPIPE_API_KEY gives one: see key())
    api_key_file: Path | None = None  # a file holding the key: kept out of `ps`, unlike --api-key
    served_model_name: str = ""  # "" = the target directory's name
    max_waiting: int = 64  # requests queued beyond --max-seqs before 429
    drain_timeout_s: float = 10.0  # SIGTERM: how long in-flight requests may still run
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    client_timeout_s: float = 30.0  # a response not read, or a request body not sent, this long is ended
    keep_alive_timeout_s: float = 5.0  # a connection with no request in progress is closed after this long
    max_connections: int = 512  # connections open at once; past it, requests get 503

    def key(self, environ: Mapping[str, str] = os.environ) -> str:
        """The API key: --api-key, else the first line of --api-key-file, else $SPECPIPE_API_KEY, else none."""
        if self.api_key and self.api_key_file is not None:
            raise ValueError("give the API key once: --api-key or --api-key-file, not both")
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text()
            except OSError as error:
                raise ValueError(f"--api-key-file {self.api_key_file}: {error.strerror or error}") from None
            key = text.strip().splitlines()[0].strip() if text.strip() else ""
            if not key:
                raise ValueError(f"--api-key-file {self.api_key_file} is empty; put the key on its first line")
            return key
        return self.api_key or environ.get(API_KEY_VARIABLE, "")

    def exposure_warning(self, key: str) -> str | None:
        """A line for the log when the server listens beyond this host and asks no key (else None)."""
        if key or self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback:
            return None
        return (f"warning: listening on {self.host} with no API key: anyone who can reach port {self.port} may use "
                f"the models; set --api-key-file or ${API_KEY_VARIABLE}")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must lie in 0..65535 (0 = any free port), got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"--max-waiting cannot be negative (0 = no queue beyond --max-seqs), got {self.max_waiting}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"--drain-timeout cannot be negative, got {self.drain_timeout_s}")
        if not self.client_timeout_s > 0:
            raise ValueError(f"--client-timeout must be positive, got {self.client_timeout_s}")
        if not self.keep_alive_timeout_s > 0:
            raise ValueError(f"--keep-alive-timeout must be positive, got {self.keep_alive_timeout_s}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be at least 1, got {self.max_connections}")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"--host takes an IP address to listen on (127.0.0.1, ::1, 0.0.0.0), got "
                                 f"{self.host!r}") from None


@dataclass(frozen=True)
class ServeConfig:
    """Everything `specpipe serve` is asked for. decode.max_new_tokens bounds every request's max_tokens and
    decode.sampling gives the defaults of fields a request leaves out."""

    models: ModelsConfig = ModelsConfig()
    decode: DecodeConfig = DecodeConfig()
    workers: WorkersConfig = WorkersConfig()
    liveness: LivenessConfig = LivenessConfig()
    remote: RemoteConfig = RemoteConfig()
    http: HttpConfig = HttpConfig()


@dataclass(frozen=True)
class LoadConfig:
    """`specpipe bench-serve`: how many requests, how fast, for how long."""

    url: str = DEFAULT_URL
    num_requests: int = 200
    concurrency: int = 1  # requests in flight at once, at most
    request_rate: float = 0.0  # Poisson arrivals per second; 0 = each client sends again when answered
    duration_s: float = 600.0  # stop sending after this long
    max_new_tokens: int = 128  # each request's max_tokens
    api_key: str = ""
    served_model_name: str = ""  # "" = the server's first model

    def validate(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must be an http:// or https:// URL, e.g. {DEFAULT_URL}; got {self.url!r}")
        if self.num_requests < 1:
            raise ValueError(f"--requests must be at least 1, got {self.num_requests}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.request_rate < 0:
            raise ValueError(f"--request-rate cannot be negative (0 = as fast as --concurrency allows), got "
                             f"{self.request_rate}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration must be positive, got {self.duration_s}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class BenchServeConfig:
    """Everything `specpipe bench-serve` is asked for."""

    load: LoadConfig = LoadConfig()
    # default: the bundled held-out code prompts, the first --warmup of them sent first and left out
    prompts: PromptsConfig = PromptsConfig(warmup=WARMUP_PROMPTS)
    sampling: SamplingParams = SamplingParams()
    output: OutputConfig = OutputConfig()  # --json: the summary as one JSON object on stdout
    json_out: Path | None = None  # the summary and every request's figures, as a JSON file
