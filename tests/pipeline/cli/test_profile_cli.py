"""`specpipe profile` end to end: a trace of all three processes on one clock, the overlap visible in it."""

import json
import subprocess
import sys

import pytest

TOLERANCE_US = 1000.0  # clock alignment is good to the probes' half round trip (tens of microseconds here)


def run_profile(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    trace = tmp_path / "trace.json"
    command = [sys.executable, "-m", "pipeline.cli.main", "profile", "--prompts", "2", "--max-new-tokens", "24",
               "--trace", str(trace), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, json.loads(trace.read_text())


def tracks(trace: dict) -> tuple[dict[str, int], dict[int, list[dict]]]:
    """process name ("coord", "draft", "target") -> pid, and pid -> its complete ("X") events."""
    pids = {e["args"]["name"].split()[0]: e["pid"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "process_name"}
    events: dict[int, list[dict]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            events.setdefault(event["pid"], []).append(event)
    return pids, events


def lane(trace: dict, pid: int, name: str) -> int:
    return next(e["tid"] for e in trace["traceEvents"]
                if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == pid and e["args"]["name"] == name)


def inside(inner: dict, outer: dict) -> bool:
    return (outer["ts"] - TOLERANCE_US <= inner["ts"]
            and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + TOLERANCE_US)


@pytest.mark.slow
def test_overlap_trace_shows_every_process_and_drafting_during_verification(tmp_path):
    result, trace = run_profile(tmp_path, "--mode", "overlap", "--k", "2")
    pids, events = tracks(trace)
    assert set(pids) == {"coord", "draft", "target"} and set(events) == set(pids.values())
    names = {process: {e["name"] for e in events[pid]} for process, pid in pids.items()}
    assert {"idle", "recv", "unpack", "speculate", "pack", "send"} <= names["draft"]
    assert {"idle", "recv", "unpack", "prefill", "verify", "pack", "send"} <= names["target"]
    assert {"schedule", "wait", "send target", "recv target", "send draft", "recv draft"} <= names["coord"]

    # every worker step lies inside the coordinator's view of that request, once clocks are aligned
    for role, kinds in (("target", {"verify", "decode", "prefill"}), ("draft", {"draft", "speculate"})):
        requests = [e for e in events[pids["coord"]] if e["tid"] == lane(trace, pids["coord"], f"{role} requests")]
        steps = [e for e in events[pids[role]] if e["name"] in kinds]
        assert len(steps) == len(requests) > 0
        for step in steps:
            assert any(r["name"] == step["name"] and r["args"] == step["args"] and inside(step, r) for r in requests), step

    # the point of overlap mode: the draft drafts ahead while the target verifies
    drafting = [(e["ts"], e["ts"] + e["dur"]) for e in events[pids["draft"]] if e["name"] == "speculate"]
    verifying = [(e["ts"], e["ts"] + e["dur"]) for e in events[pids["target"]] if e["name"] == "verify"]
    assert any(min(d1, v1) - max(d0, v0) > 0 for d0, d1 in drafting for v0, v1 in verifying)

    assert trace["otherData"]["tokens"] == 48 and trace["otherData"]["mode"] == "overlap"
    assert "overlap: the draft computed during" in result.stdout
    assert "; warm-up " in result.stdout.splitlines()[0]  # --warmup 1 by default: one prompt, not traced
    wall_line = next(line for line in result.stdout.splitlines() if line.startswith("target's wall: "))
    shares = [float(part.rsplit(" ", 1)[1].rstrip("%")) for part in wall_line.split(": ", 1)[1].split(", ")]
    assert len(shares) == 3 and sum(shares) == pytest.approx(100, abs=0.2) and shares[0] > 50
    assert "measured/theory" in result.stdout and f"trace: {tmp_path / 'trace.json'}" in result.stdout


@pytest.mark.slow
def test_target_only_trace_has_no_draft_process(tmp_path):
    result, trace = run_profile(tmp_path, "--mode", "target-only", "--warmup", "0")
    pids, events = tracks(trace)
    assert set(pids) == {"coord", "target"}
    assert {"prefill", "decode"} <= {e["name"] for e in events[pids["target"]]}
    assert "warm-up" not in result.stdout and "overlap:" not in result.stdout
