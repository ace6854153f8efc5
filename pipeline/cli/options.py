"""Every option of specpipe's commands, each defined once; the commands compose them (see pipeline.cli.main).

An option fills the field of its name in the command's config (pipeline.cli.launch's LaunchConfig,
BenchConfig, ProfileConfig, the worker's WorkerSettings), and its default is that field's default
(tests/pipeline/cli/test_options.py holds them to it).
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.bench.background import BackgroundLoad
from pipeline.bench.config import BENCH_PEERS
from pipeline.cli.parameters import ChoiceList, CoreList, Option, Sweep, options
from pipeline.config import (
    K_POLICIES,
    MEASURED_PROMPTS,
    MODES,
    WARMUP_PROMPTS,
    DecodeConfig,
    ModelsConfig,
    WorkersConfig,
)
from pipeline.distill.config import DraftShape, EvalConfig, TrainingConfig
from pipeline.runtime.cluster import LivenessConfig
from pipeline.serving.config import HttpConfig, LoadConfig
from workers.protocol.limits import MAX_BRANCHES, MAX_TRACE_SPANS
from workers.sampling import SamplingParams
from workers.worker_settings import DTYPE_CHOICES, WorkerSettings

CHECKPOINT_DIR = click.Path(path_type=Path)
BACKENDS = click.Choice(["torch", "ttnn"])
DEVICE_HELP = "cpu, cuda or cuda:N; with --backend ttnn, Tenstorrent chips: tt, tt:N, tt:0/1x2 (see docs/tenstorrent.md)."

# --- models and prompts ----------------------------------------------------------------------------

DRAFT = Option("--draft", "draft_dir", "Draft checkpoint directory (Hugging Face layout).", CHECKPOINT_DIR,
               ModelsConfig.draft_dir, show_default="bundled draft")
TARGET = Option("--target", "target_dir", "Target checkpoint directory (Hugging Face layout); the coordinator "
                "tokenizes with its tokenizer.", CHECKPOINT_DIR, ModelsConfig.target_dir, show_default="bundled target")
PROMPT = Option("--prompt", "texts", "A prompt; repeat for several.", click.STRING, multiple=True, show_default=False)
PROMPTS_FILE = Option("--prompts-file", "file", "Prompts, one JSON string per line (launch and profile run them after "
                      "any --prompt). bench and profile take --warmup of its lines first, then --prompts more; "
                      "without it, of the bundled held-out code prompts.",
                      click.Path(exists=True, dir_okay=False, path_type=Path))
PROMPT_COUNT = Option("--prompts", "count", "How many prompts of --prompts-file (or of the bundled held-out code "
                      "prompts) to run after the --warmup ones.", click.INT, MEASURED_PROMPTS)
WARMUP = Option("--warmup", "warmup", "Prompts of --prompts-file (or of the bundled held-out code prompts) run first "
                "and reported apart; 0 = none.", click.INT, WARMUP_PROMPTS)

# --- decoding --------------------------------------------------------------------------------------

MODE = Option("--mode", "mode", "overlap: the draft drafts ahead while the target verifies; serial: draft, then "
              "verify; target-only: the target alone.", click.Choice(MODES), DecodeConfig.mode)
K = Option("--k", "k", "Drafted tokens per verification.", click.INT, DecodeConfig.k, sweepable=True)
MAX_NEW_TOKENS = Option("--max-new-tokens", "max_new_tokens", "New tokens per prompt, at most (serve: per request "
                        "that gives no max_tokens; bench-serve: each request's max_tokens; distill: the target's "
                        "greedy tokens per evaluation prompt).", click.INT,
                        DecodeConfig.max_new_tokens)
K_POLICY = Option("--k-policy", "k_policy", "How many tokens each window drafts: fixed = always --k; adaptive = "
                  "between 1 and --k, one more after a fully accepted window, down to what was accepted after a "
                  "rejection; goodput = between 0 and --k per step and sequence, whatever the measured acceptance "
                  "and forward-pass costs say maximises the batch's tokens per second (0 stops speculating).",
                  click.Choice(K_POLICIES), DecodeConfig.k_policy)
MAX_BRANCHES = Option("--max-branches", "max_branches", f"Overlap: at most this many outcomes of a verification "
                      f"drafted ahead at once (1 = only 'all accepted, bonus guessed'; at most {MAX_BRANCHES}); how "
                      "many fit is learnt while running.", click.INT, DecodeConfig.max_branches, sweepable=True)
TEMPERATURE = Option("--temperature", "temperature", "0 = greedy.", click.FLOAT, SamplingParams.temperature)
TOP_P = Option("--top-p", "top_p", "Sample from the likeliest tokens holding this much probability; 1 = off.",
               click.FLOAT, SamplingParams.top_p)
TOP_K = Option("--top-k", "top_k", "Sample from this many likeliest tokens; 0 = off.", click.INT, SamplingParams.top_k)
SEED = Option("--seed", "seed", "Seed of the sampling (with --temperature above 0).", click.INT, SamplingParams.seed)
CONCURRENCY = Option("--concurrency", "concurrency", "Prompts decoded at once.", click.INT, 1, sweepable=True)
MAX_SEQS = Option("--max-seqs", "max_seqs", "Sequences the workers hold at once (a KV slot of the whole context "
                  "each, in both workers); more prompts than this wait in order.", click.INT, DecodeConfig.max_seqs)
PREFILL_CHUNK = Option("--prefill-chunk", "prefill_chunk", "Prefill prompts this many tokens per target step, beside "
                       "the running sequences' windows; 0 = a whole prompt in one step.", click.INT,
                       DecodeConfig.prefill_chunk)

# --- the workers -----------------------------------------------------------------------------------

BACKEND = Option("--backend", "backend", "torch (CPU or CUDA), or ttnn (Tenstorrent chips).", BACKENDS,
                 WorkersConfig.backend)
DRAFT_DEVICE = Option("--draft-device", "draft_device", f"The draft worker's device: {DEVICE_HELP}", click.STRING,
                      WorkersConfig.draft_device)
TARGET_DEVICE = Option("--target-device", "target_device", f"The target worker's device: {DEVICE_HELP}", click.STRING,
                       WorkersConfig.target_device)
THREADS = Option("--threads", "threads", "CPU threads per worker; the workers a command starts are pinned to cores of "
                 "their own when the machine has enough.", click.INT, WorkersConfig.threads)
TARGET_THREADS = Option("--target-threads", "target_threads", "CPU threads of the target worker (its kernels split "
                        "each pass over them); 0 = --threads.", click.INT, WorkersConfig.target_threads)
DRAFT_THREADS = Option("--draft-threads", "draft_threads", "CPU threads of the draft worker; 0 = --threads.",
                       click.INT, WorkersConfig.draft_threads)
MAX_MODEL_LEN = Option("--max-model-len", "max_model_len", "Positions (prompt and output) each sequence may hold: its "
                       "KV slot in each worker, allocated up front. At most the model's context; 0 = the model's "
                       "whole context (128k positions of a Llama-3 model take gigabytes per slot).", click.INT,
                       WorkersConfig.max_model_len)
DRAFT_NICE = Option("--draft-nice", "draft_nice", "Niceness to add to a draft worker that shares the coordinator's "
                    "core (0-19): a draft that matters less than anything else on the machine. 0 = as the "
                    "coordinator.", click.INT, WorkersConfig.draft_nice)
DTYPE = Option("--dtype", "dtype", "float32, bfloat16, float16, or fp16-weights (CPU: fp16 weights and fp32 maths "
               "in specpipe's C kernels, fbgemm where they cannot build); auto = fp16-weights on a CPU where either "
               "runs (else float32), bfloat16 on CUDA, as each worker finds.",
               click.Choice(DTYPE_CHOICES), WorkersConfig.dtype)
READY_TIMEOUT = Option("--ready-timeout", "ready_timeout_s", "Seconds to wait for the workers to load.", click.FLOAT,
                       LivenessConfig.ready_timeout_s)
HEARTBEAT_INTERVAL = Option("--heartbeat-interval", "heartbeat_interval_s", "Seconds between heartbeats to each worker "
                            "(answered by ZeroMQ itself, even mid-forward-pass).", click.FLOAT,
                            LivenessConfig.heartbeat_interval_s)
HEARTBEAT_TIMEOUT = Option("--heartbeat-timeout", "heartbeat_timeout_s", "Seconds of silence after which a worker "
                           "counts as hung and the launch fails.", click.FLOAT, LivenessConfig.heartbeat_timeout_s)

# --- workers started by hand, maybe on other hosts -------------------------------------------------

TARGET_ADDR = Option("--target-addr", "target_addr", "Use the `specpipe worker --role target` already listening at "
                     "ADDR (tcp://HOST:PORT) instead of spawning one; --target then only provides the tokenizer.",
                     click.STRING, "", show_default=False, metavar="ADDR")
DRAFT_ADDR = Option("--draft-addr", "draft_addr", "Likewise for the draft worker.", click.STRING, "",
                    show_default=False, metavar="ADDR")
CURVE_SECRET_KEY = Option("--curve-secret-key", "curve_secret_key", "This process's CURVE key pair (NAME.key_secret "
                          "from `specpipe keygen`). A worker encrypts and authenticates every connection with it "
                          "(without it, it binds only loopback or ipc://); a launch needs it for any worker given by "
                          "an address off this host.", click.STRING, "", show_default=False, metavar="FILE")
TARGET_SERVER_KEY = Option("--target-server-key", "target_server_key", "The public key (NAME.key) of the worker at "
                           "--target-addr.", click.STRING, "", show_default=False, metavar="FILE")
DRAFT_SERVER_KEY = Option("--draft-server-key", "draft_server_key", "The public key (NAME.key) of the worker at "
                          "--draft-addr.", click.STRING, "", show_default=False, metavar="FILE")

# --- `specpipe serve` and `specpipe bench-serve` ---------------------------------------------------

HOST = Option("--host", "host", "Address to listen on: loopback unless you mean to serve the network (0.0.0.0 or "
              "::); then set --api-key too.", click.STRING, HttpConfig.host)
PORT = Option("--port", "port", "TCP port to listen on (0 = any free one, logged at start).", click.INT, HttpConfig.port)
API_KEY = Option("--api-key", "api_key", "The key of the API (HTTP header Authorization: Bearer KEY): serve refuses "
                 "requests without it, bench-serve sends it; empty = none.", click.STRING, HttpConfig.api_key,
                 show_default=False, metavar="KEY")
API_KEY_FILE = Option("--api-key-file", "api_key_file", "A file whose first line is the API key (kept out of the "
                      "process list, unlike --api-key); without either, $SPECPIPE_API_KEY if set.",
                      click.Path(dir_okay=False, path_type=Path), metavar="FILE")
SERVED_MODEL_NAME = Option("--served-model-name", "served_model_name", "The model name of the API: what serve lists and "
                           "answers to (default: the target directory's name), what bench-serve asks for (default: "
                           "the server's first model).", click.STRING, HttpConfig.served_model_name,
                           show_default=False, metavar="NAME")
MAX_WAITING = Option("--max-waiting", "max_waiting", "Requests queued beyond --max-seqs; more get 429 Too Many "
                     "Requests with Retry-After.", click.INT, HttpConfig.max_waiting)
DRAIN_TIMEOUT = Option("--drain-timeout", "drain_timeout_s", "On SIGTERM or Ctrl-C: seconds the requests in flight "
                       "may take to finish (new ones get 503) before they are cancelled.", click.FLOAT,
                       HttpConfig.drain_timeout_s)
CLIENT_TIMEOUT = Option("--client-timeout", "client_timeout_s", "Seconds a client may leave a response unread, or "
                        "a request body unsent, before the server ends it and frees its slot.", click.FLOAT,
                        HttpConfig.client_timeout_s)
KEEP_ALIVE_TIMEOUT = Option("--keep-alive-timeout", "keep_alive_timeout_s", "Seconds a connection may stay open "
                            "with no request in progress (before its first, or between two).", click.FLOAT,
                            HttpConfig.keep_alive_timeout_s)
MAX_CONNECTIONS = Option("--max-connections", "max_connections", "Connections open at once; requests past it get "
                         "503.", click.INT, HttpConfig.max_connections)
URL = Option("--url", "url", "The server's base URL (the part before /v1).", click.STRING, LoadConfig.url)
REQUESTS = Option("--requests", "num_requests", "Requests to send: the prompts of --prompts-file (or the bundled "
                  "held-out code prompts) in turn, as many times as it takes.", click.INT, LoadConfig.num_requests)
REQUEST_RATE = Option("--request-rate", "request_rate", "Requests per second, arriving as a Poisson process (never "
                      "more than --concurrency in flight); 0 = each of --concurrency clients sends again once answered.",
                      click.FLOAT, LoadConfig.request_rate)
DURATION = Option("--duration", "duration_s", "Send no request after this many seconds; those in flight finish.",
                  click.FLOAT, LoadConfig.duration_s)

# --- what is written -------------------------------------------------------------------------------

JSON = Option("--json", "json_lines", "JSON on stdout instead of text: one object per prompt (launch), one for the "
              "run (bench-serve).", default=False, show_default=False)
JSON_OUT = Option("--json-out", "json_out", "Write every figure to this JSON file.",
                  click.Path(dir_okay=False, path_type=Path), metavar="FILE")
REPORT = Option("--report", "report_dir", "Write a Markdown report with PNG plots into this directory.",
                click.Path(file_okay=False, path_type=Path), metavar="DIR")
REPETITIONS = Option("--repetitions", "repetitions", "Passes over the prompts.", click.INT, 1)
PEERS = Option("--peers", "peers", "Other engines to run on the same models and prompts: transformers (generate "
               "and assisted generation), llama.cpp (its server, target alone and speculative at each --k; built by "
               "scripts/build_llama_cpp.py, left out with a note when absent); none for neither.",
               ChoiceList(BENCH_PEERS), ",".join(BENCH_PEERS))
BACKGROUND_LOAD = Option("--background-load", "background_load", "Busy processes to run beside the whole bench (a "
                         "stand-in for a compile or a neighbouring service): each a Python loop, started before the "
                         "workers and ended with the run; 0 = none.", click.INT, BackgroundLoad.background_load)
BACKGROUND_NICE = Option("--background-nice", "background_nice", "The niceness of --background-load's processes.",
                         click.INT, BackgroundLoad.background_nice)
BACKGROUND_CORES = Option("--background-cores", "background_cores", "Comma-separated cores for --background-load's "
                          "processes, one each in turn (default: every core bench may use).", CoreList(), "",
                          show_default=False)
TRACE = Option("--trace", "trace_path", "Where to write the Chrome / Perfetto trace (trace-event JSON).",
               click.Path(dir_okay=False, path_type=Path), Path("specpipe-trace.json"))
MAX_SPANS = Option("--max-spans", "max_spans", "Spans kept per process.", click.INT, MAX_TRACE_SPANS)

# --- `specpipe worker` -----------------------------------------------------------------------------

ROLE = Option("--role", "role", "Which model it serves.", click.Choice(["draft", "target"]), required=True,
              show_default=False)
CHECKPOINT = Option("--checkpoint", "checkpoint", "Checkpoint directory (Hugging Face layout).", click.STRING,
                    required=True, show_default=False)
BIND = Option("--bind", "bind", "ZeroMQ address to listen on, e.g. ipc:///tmp/w.sock or tcp://127.0.0.1:5555.",
              click.STRING, required=True, show_default=False)
DEVICE = Option("--device", "device", f"Its device: {DEVICE_HELP}", click.STRING, WorkerSettings.device)
CORES = Option("--cores", "cores", "Comma-separated CPU cores to pin to.", CoreList(), "", show_default=False)
IO_CORES = Option("--io-cores", "io_cores", "Comma-separated CPU cores for ZeroMQ's I/O threads (default: with the "
                  "rest); launch puts a pinned target's on the coordinator's cores.", CoreList(), "",
                  show_default=False)
SLOTS = Option("--slots", "slots", "Sequences held at once.", click.INT, WorkerSettings.slots)
MAX_SEQ_LEN = Option("--max-seq-len", "max_seq_len", "Positions per KV slot, at most the model's context; 0 = the "
                     "model's context.", click.INT, WorkerSettings.max_seq_len)
SPIN_MS = Option("--spin-ms", "spin_ms", "Busy-poll this long for the next request before sleeping (only on a core "
                 "of its own).", click.FLOAT, WorkerSettings.spin_ms)
NICE = Option("--nice", "nice", "Niceness to add (yield the core to others); a worker that leads its session, as "
              "launch starts them, nices the session too (autogroup scheduling shares a core between sessions by "
              "theirs).", click.INT, WorkerSettings.nice)
PARENT_PID = Option("--parent-pid", "parent_pid", "Exit when this process is gone (set by launch for the workers it "
                    "spawns); 0 = never.", click.INT, WorkerSettings.parent_pid)
CURVE_CLIENTS = Option("--curve-clients", "curve_clients", "Public key file (NAME.key) of a coordinator allowed to "
                       "connect, or a directory of them; repeat for several. Every other client is refused.",
                       click.STRING, multiple=True, show_default=False, metavar="PATH")

# --- `specpipe distill` ----------------------------------------------------------------------------

OUT = Option("--out", "out_dir", "Directory the draft checkpoint goes to; its resumable state stays in OUT/state (a "
             "rerun with the same --out continues).", click.Path(file_okay=False, path_type=Path), metavar="DIR")
CORPUS = Option("--corpus", "corpus", "A directory of Python source (*.py, searched recursively) to distil on; repeat "
                "for several. None: this Python's standard library, tests left out.",
                click.Path(exists=True, file_okay=False, path_type=Path), multiple=True, show_default=False,
                metavar="DIR")
INIT = Option("--init", "init_dir", "Start from this draft checkpoint's weights and shape instead of random ones; a "
              "--layers above its own appends layers that start as the identity.",
              click.Path(exists=True, file_okay=False, path_type=Path), metavar="DIR")
LAYERS = Option("--layers", "layers", "The draft's decoder layers.", click.INT, DraftShape.layers)
WIDTH = Option("--width", "width", "The draft's hidden size: heads of 64, half as many KV heads, SwiGLU 2.75x as "
               "wide.", click.INT, DraftShape.width)
MINUTES = Option("--minutes", "minutes", f"Train for this many minutes (without --steps: "
                 f"{TrainingConfig.DEFAULT_MINUTES:g}).", click.FLOAT, TrainingConfig.minutes, show_default=False)
STEPS = Option("--steps", "steps", "Train this many steps instead of for --minutes.", click.INT, TrainingConfig.steps)
BATCH_SIZE = Option("--batch-size", "batch_size", "Windows per step: half from the corpus, half from the target's "
                    "continuations.", click.INT, TrainingConfig.batch_size)
SEQ_LEN = Option("--seq-len", "seq_len", "Tokens per window.", click.INT, TrainingConfig.seq_len)
LEARNING_RATE = Option("--learning-rate", "learning_rate", "Peak learning rate (linear warm-up, then cosine decay to "
                       "a tenth).", click.FLOAT, TrainingConfig.learning_rate)
GENERATIONS = Option("--generations", "generations", "Continuations of corpus windows the target writes (192 tokens "
                     "each, half greedy, half sampled) for the draft to learn on.", click.INT,
                     TrainingConfig.generations)
EVAL_ONLY = Option("--eval-only", "eval_only", "Only evaluate --draft against --target on the prompts; train "
                   "nothing.", default=False, show_default=False)
EVAL_K = Option("--eval-k", "windows", "Comma-separated window sizes at which the evaluation reports mean "
                "acceptance length.", Sweep(click.INT), EvalConfig.windows, show_default="1,3,5")

# --- `specpipe keygen` -----------------------------------------------------------------------------

KEY_NAME = Option("--name", "name", "Base name: writes DIRECTORY/NAME.key (public) and NAME.key_secret.",
                  click.STRING, required=True, show_default=False)

# --- the groups the commands compose ---------------------------------------------------------------

models_options = options(DRAFT, TARGET)
sampling_options = options(TEMPERATURE, TOP_P, TOP_K, SEED)
liveness_options = options(READY_TIMEOUT, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT)
remote_options = options(TARGET_ADDR, DRAFT_ADDR, CURVE_SECRET_KEY, TARGET_SERVER_KEY, DRAFT_SERVER_KEY)

launch_options = options(
    models_options, PROMPT, PROMPTS_FILE, MAX_NEW_TOKENS, K, MODE, K_POLICY, MAX_BRANCHES, sampling_options,
    CONCURRENCY, MAX_SEQS, PREFILL_CHUNK, BACKEND, DRAFT_DEVICE, TARGET_DEVICE, THREADS, TARGET_THREADS,
    DRAFT_THREADS, DRAFT_NICE, DTYPE, liveness_options, remote_options, JSON)
bench_options = options(
    models_options, PROMPTS_FILE, PROMPT_COUNT, WARMUP, K.sweep(), MAX_BRANCHES.sweep(), CONCURRENCY.sweep(),
    MAX_NEW_TOKENS, PREFILL_CHUNK, REPETITIONS, PEERS, THREADS, TARGET_THREADS, DRAFT_THREADS, MAX_MODEL_LEN,
    DRAFT_NICE, DTYPE, BACKGROUND_LOAD, BACKGROUND_NICE, BACKGROUND_CORES, JSON_OUT, REPORT)
profile_options = options(
    models_options, PROMPT, PROMPTS_FILE, PROMPT_COUNT, WARMUP, MAX_NEW_TOKENS, K, MODE, K_POLICY, CONCURRENCY,
    MAX_SEQS, PREFILL_CHUNK, THREADS, TARGET_THREADS, DRAFT_THREADS, MAX_MODEL_LEN, DRAFT_NICE, DTYPE, TRACE,
    MAX_SPANS)
serve_options = options(
    models_options, MAX_NEW_TOKENS, K, MODE, K_POLICY, MAX_BRANCHES, sampling_options, MAX_SEQS, PREFILL_CHUNK,
    BACKEND, DRAFT_DEVICE, TARGET_DEVICE, THREADS, TARGET_THREADS, DRAFT_THREADS, MAX_MODEL_LEN, DRAFT_NICE, DTYPE,
    liveness_options, remote_options, HOST, PORT, API_KEY, API_KEY_FILE, SERVED_MODEL_NAME, MAX_WAITING,
    DRAIN_TIMEOUT, CLIENT_TIMEOUT, KEEP_ALIVE_TIMEOUT, MAX_CONNECTIONS)
bench_serve_options = options(
    URL, API_KEY, SERVED_MODEL_NAME, PROMPTS_FILE, WARMUP, REQUESTS, CONCURRENCY, REQUEST_RATE, DURATION,
    MAX_NEW_TOKENS, sampling_options, JSON, JSON_OUT)
distill_options = options(
    models_options, OUT, CORPUS, INIT, LAYERS, WIDTH, MINUTES, STEPS, BATCH_SIZE, SEQ_LEN, LEARNING_RATE,
    GENERATIONS, EVAL_ONLY, EVAL_K, PROMPTS_FILE, PROMPT_COUNT, MAX_NEW_TOKENS, JSON_OUT)
worker_options = options(
    ROLE, CHECKPOINT, BIND, BACKEND, DEVICE, DTYPE, THREADS, CORES, IO_CORES, SLOTS, MAX_SEQ_LEN, SPIN_MS, NICE,
    PARENT_PID, CURVE_SECRET_KEY, CURVE_CLIENTS)
