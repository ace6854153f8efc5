"""The real thing: worker processes over ZeroMQ, driven through the Python API and the CLI."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.algorithm.generation import generate
from pipeline.config import DecodeConfig
from pipeline.runtime.cluster import ClusterConfig, LocalCluster, default_cores
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.model.checkpoint import load_tokenizer
from workers.worker_settings import WorkerSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts():
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:20]]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:40] for t in texts]


@pytest.fixture(scope="module")
def cluster():
    affinity = os.sched_getaffinity(0)
    draft_cores, target_cores = default_cores([1, 1])
    config = ClusterConfig(
        target=WorkerSettings("target", str(TARGET_DIR), "", slots=4, max_seq_len=256, cores=target_cores),
        draft=WorkerSettings("draft", str(DRAFT_DIR), "", slots=4, max_seq_len=256, cores=draft_cores),
    )
    with LocalCluster(config) as running:
        yield running
    for process in running.processes.values():
        assert process.poll() is not None  # both workers are gone
    assert os.sched_getaffinity(0) == affinity  # the coordinator's pinning is undone


def test_a_draft_asked_to_yield_does_so_as_a_whole_session():
    # first in the module: the cluster fixture, while it runs, pins this process to the coordinator's core
    draft_cores, target_cores = default_cores([1, 1])
    if not os.path.exists("/proc/self/autogroup") or not target_cores:
        pytest.skip("no autogroup scheduling here, or nothing pinned")
    config = ClusterConfig(
        target=WorkerSettings("target", str(TARGET_DIR), "", slots=1, max_seq_len=64, cores=target_cores),
        draft=WorkerSettings("draft", str(DRAFT_DIR), "", slots=1, max_seq_len=64, cores=draft_cores), draft_nice=19)
    with LocalCluster(config) as running:
        draft = running.processes["draft"].pid
        assert os.getpriority(os.PRIO_PROCESS, draft) == os.getpriority(os.PRIO_PROCESS, 0) + 19
        with open(f"/proc/{draft}/autogroup") as group:
            assert group.read().strip().endswith("nice 19")


def test_twenty_prompts_identical_across_modes_k_and_concurrency(cluster, prompts):
    def run(mode, k, concurrency):
        sequences, _ = generate(cluster.transport, prompts, DecodeConfig(mode, k, max_new_tokens=16, k_policy="fixed"), cluster.limits(),
                                concurrency)
        return [s.generated for s in sequences]

    if cluster.config.target.cores:  # pinned: the coordinator keeps off the target's core
        assert not os.sched_getaffinity(0) & set(cluster.config.target.cores)
    baseline = run("target-only", 5, 1)
    assert all(len(tokens) == 16 for tokens in baseline)
    for mode in ("serial", "overlap"):
        for k in (1, 3, 8):
            assert run(mode, k, 4) == baseline, f"{mode} k={k}"


def test_every_thread_of_a_worker_stays_on_its_cores(cluster):
    # ZeroMQ's I/O thread and the connection monitor start before a worker pins itself; left free they
    # land on the target's core and preempt it (target-only ran 20 % slower so). The target's ZeroMQ
    # threads go to the coordinator's cores: each reply they carry would preempt it on its own.
    target_cores = set(cluster.config.target.cores)
    if not target_cores:
        pytest.skip("fewer than two cores: nothing is pinned")
    coordinator_cores = set(os.sched_getaffinity(0))
    for role, process in cluster.processes.items():
        cores = set(getattr(cluster.config, role).cores)
        threads = {tid: open(f"/proc/{process.pid}/task/{tid}/comm").read().strip()
                   for tid in os.listdir(f"/proc/{process.pid}/task")}
        assert "ZMQbg/IO/0" in threads.values() and len(threads) > 2
        expected = {tid: coordinator_cores if role == "target" and name.startswith("ZMQbg/") else cores
                    for tid, name in threads.items()}
        assert {tid: os.sched_getaffinity(int(tid)) for tid in threads} == expected, role
    assert not coordinator_cores & target_cores
    coordinator_threads = os.listdir("/proc/self/task")
    assert all(not os.sched_getaffinity(int(tid)) & set(cluster.config.target.cores) for tid in coordinator_threads)


def test_no_worker_runs_below_the_coordinator_s_priority_unless_asked(cluster):
    # a draft niced below the coordinator lost its core to any normal-priority neighbour (a compile, a test run)
    for process in cluster.processes.values():
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == os.getpriority(os.PRIO_PROCESS, 0)


def launch(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_launch_json_contract():
    result = launch("--prompt", "import os\n", "--prompt", "def f(x):\n", "--max-new-tokens", "12", "--k", "3", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["import os\n", "def f(x):\n"]
    for record in records:
        assert record["mode"] == "overlap" and record["k"] == 3 and record["finish_reason"] in ("length", "eos")
        assert record["new_tokens"] == len(record["token_ids"]) <= 12
        assert 0 <= record["accepted"] <= record["drafted"]
        assert record["tokens_per_s"] == pytest.approx(record["new_tokens"] / record["wall_s"])
        assert 0 < record["ttft_s"] <= record["wall_s"]
    assert "[coord]" in result.stderr and "[draft]" in result.stderr and "[target]" in result.stderr
    # the run's throughput, on stderr beside the logs (stdout holds the records alone)
    tokens = sum(r["new_tokens"] for r in records)
    assert f"[coord] 2 prompt(s), {tokens} new tokens in " in result.stderr and "tokens/s at concurrency 1" in result.stderr


def test_what_a_worker_writes_to_stdout_stays_out_of_the_json_records(tmp_path):
    # tt-metal logs to stdout inside a worker; such lines must reach stderr, never the records
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nif 'worker' in sys.argv:\n    print('a library talking on stdout', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "launch", "--prompt", "import os\n",
                             "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["new_tokens"] for line in result.stdout.splitlines()] == [4]
    assert result.stderr.count("a library talking on stdout") == 2  # one line from each worker


def test_launch_streams_text_and_a_stats_line():
    result = launch("--prompt", "class Stack:\n", "--max-new-tokens", "8", "--mode", "serial")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("class Stack:\n")
    assert "tokens/s" in result.stdout.splitlines()[-1]


def test_pair_with_different_vocabularies_is_refused(checkpoints):
    result = launch("--target", str(checkpoints["llama-tied"][0]), "--prompt", "x", "--max-new-tokens", "2")
    # the test checkpoint has no tokenizer: refused before any process starts
    assert result.returncode == 2 and "tokenizer" in result.stderr


def test_vocabulary_mismatch_is_refused_after_ready(tmp_path, checkpoints):
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoints["llama-tied"][0], foreign)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TARGET_DIR / name, foreign / name)
    result = launch("--draft", str(foreign), "--prompt", "x", "--max-new-tokens", "2")
    assert result.returncode == 2
    assert "do not share a vocabulary" in result.stderr and "--draft" in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400
