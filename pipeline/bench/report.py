"""The bench's outputs: a table on stdout, every figure as JSON, a Markdown report with PNG plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.bench.figures import Figures
from pipeline.bench.run import BenchResult


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    header = ["config", "tok/s", "decode tok/s", "vs target-only", "vs hf", "predicted", "meas/pred", "TTFT ms",
              "ITL p50/p90/p99 ms", "accept", "mean len", "hit", "branches", "target busy/ipc/idle", "draft busy", "coord",
              "target wall: compute/draft/coord+IPC"]
    rows = []
    for f in result.configs:
        split = f.time_split_s
        wall = f.wall_s

        def share(process: str, part: str) -> str:
            return f"{split[process][part] / wall:.0%}" if process in split else "-"

        rows.append([
            f.name, f"{f.tokens_per_s:.1f}", f"{f.decode_tokens_per_s:.1f}",
            _fmt(f.speedup_vs_target_only, ".2f", "x"), _fmt(f.speedup_vs_hf_target_only, ".2f", "x"),
            _fmt(f.predicted_speedup, ".2f", "x"), _fmt(f.measured_over_predicted, ".2f"), f"{f.ttft_s * 1e3:.0f}",
            "/".join(f"{f.itl_ms[p]:.1f}" for p in ("p50", "p90", "p99")),
            _fmt(f.acceptance_rate, ".1%"), _fmt(f.mean_acceptance_length, ".2f"), _fmt(f.predraft_hit_rate, ".0%"),
            _fmt(f.mean_branches, ".1f"),
            "/".join(share("target", part) for part in ("busy", "ipc", "idle")) if "target" in split else "-",
            share("draft", "busy"), share("coordinator", "busy"), wall_shares(f),
        ])
    return header, rows


def wall_shares(f: Figures) -> str:
    shares = f.target_wall_shares
    if not shares:
        return "-"
    return "/".join(f"{shares[bucket]:.1%}" for bucket in ("compute", "draft_compute", "coordination"))


def text_table(result: BenchResult) -> str:
    header, rows = table_rows(result)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def describe(result: BenchResult) -> list[str]:
    """The lines under the table: setting, identity check, acceptance detail, warm-up."""
    s, m = result.settings, result.machine
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}",
             f"{s['prompts']} prompts x {s['repetitions']} repetition(s), {s['max_new_tokens']} new tokens at most, "
             f"greedy, dtype {s['dtype']}, {s['placement']}; warm-up: {s['warmup']} prompt(s) per configuration, "
             "not counted",
             f"greedy outputs token-identical across all specpipe configurations: "
             f"{'yes' if result.identical_greedy_outputs else 'NO'}"]
    lines.append("target wall: each instant of the target's timeline (all three processes traced) put in one bucket: "
                 "computing; idle while the draft drafted; or coordinator and IPC (its own message handling, idle "
                 "while the coordinator ran, while the draft handled messages, or while messages crossed)")
    lines += [f"{peer} identical to specpipe target-only: {count} prompts" for peer, count in result.peers_identical.items()]
    for f in result.configs:
        if f.per_position_acceptance:
            positions = ", ".join(_fmt(rate, ".2f") for rate in f.per_position_acceptance)
            lines.append(f"{f.name}: per-position acceptance {positions}; accepted-length histogram "
                         f"{f.accepted_length_histogram}")
    for f in result.configs:
        w = f.warmup
        if w["sequences"]:
            lines.append(f"warm-up {f.name}: {w['tokens']} tokens in {w['wall_s']:.2f} s")
    return lines


def as_json(result: BenchResult) -> dict:
    return {"machine": result.machine, "settings": result.settings,
            "identical_greedy_outputs": result.identical_greedy_outputs,
            "peers_identical": result.peers_identical,
            "configs": [dataclasses.asdict(f) for f in result.configs]}


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(as_json(result), indent=2, allow_nan=False, default=_finite))


def _finite(value):  # json cannot hold NaN; a missing figure is null
    return None


def write_report(result: BenchResult, directory: Path) -> list[Path]:
    """README-ready Markdown (report.md) and three PNG plots; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, directory)
    header, rows = table_rows(result)
    markdown = ["# specpipe bench", "", f"`{result.settings['command']}`", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    markdown += [""] + [f"- {line}" for line in describe(result)] + [""]
    markdown += [f"![{path.stem}]({path.name})" for path in plots]
    report = directory / "report.md"
    report.write_text("\n".join(markdown) + "\n")
    return [report, *plots]


def _plots(result: BenchResult, directory: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--report draws its plots with matplotlib: pip install 'specpipe[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result.configs
    paths = []

    figure, axes = plt.subplots(figsize=(9, 4))
    colors = ["tab:gray" if f.system == "transformers" else "tab:blue" for f in configs]
    axes.bar([f.name for f in configs], [f.tokens_per_s for f in configs], color=colors)
    axes.set_ylabel("tokens/s (wall clock)")
    axes.set_title(f"{result.machine['cpu']}, {result.machine['date']}")
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    paths.append(directory / "tokens_per_s.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    speculative = [f for f in configs if f.accepted_length_histogram and f.mode == "overlap"]
    figure, axes = plt.subplots(figsize=(7, 4))
    for f in speculative:
        total = sum(f.accepted_length_histogram)
        axes.plot(range(len(f.accepted_length_histogram)), [c / total for c in f.accepted_length_histogram],
                  marker="o", label=f.name)
    axes.set_xlabel("drafted tokens accepted per verification")
    axes.set_ylabel("share of verifications")
    axes.legend()
    figure.tight_layout()
    paths.append(directory / "accepted_lengths.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    ours = [f for f in configs if f.time_split_s]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    parts = [("target", "busy", "tab:blue"), ("target", "ipc", "tab:cyan"), ("draft", "busy", "tab:orange"),
             ("draft", "ipc", "tab:olive"), ("coordinator", "busy", "tab:red")]
    width = 0.8 / 3
    for offset, process in enumerate(("target", "draft", "coordinator")):
        bottom = [0.0] * len(ours)
        for owner, part, color in parts:
            if owner != process:
                continue
            values = [f.time_split_s.get(process, {}).get(part, 0.0) / f.wall_s for f in ours]
            axes.bar([i + (offset - 1) * width for i in range(len(ours))], values, width, bottom=bottom,
                     color=color, label=f"{process} {part}")
            bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_xticks(range(len(ours)), [f.name for f in ours], rotation=30)
    axes.set_ylabel("share of wall time (bars: target, draft, coordinator)")
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    paths.append(directory / "time_split.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths
