"""The bench's outputs: a table on stdout, every figure as JSON, a Markdown report with PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from pipeline.bench.figures import Figures
from pipeline.bench.llama_cpp import SWEPT_DRAFT_P_MIN
from pipeline.bench.run import BenchResult

PEER_COLORS = {"transformers": "tab:gray", "llama.cpp": "tab:green"}  # bars of other engines (ours: default colours)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def speculation_off(f: Figures) -> str:
    """How often the goodput controller switched speculation off, and for how long ("-" when never)."""
    events = f.speculation.get("speculation_off_events") or 0
    if not events:
        return "-"
    seconds = f.speculation.get("speculation_off_s")
    return f"{events}" + (f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else "")


def table_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    header = ["config", "conc", "tok/s", "decode tok/s", "vs target-only", "vs hf", "vs llama.cpp", "predicted",
              "meas/pred",
              "TTFT ms", "ITL p50/p90/p99 ms", "accept", "mean len", "mean drafted", "hit", "branches", "spec off",
              "target busy/ipc/idle", "draft busy", "coord", "target wall: compute/draft/coord+IPC"]
    rows = []
    for f in sorted(result.configs, key=lambda f: f.concurrency):  # stable: configurations keep their order
        split = f.time_split_s
        wall = f.wall_s

        def share(process: str, part: str) -> str:
            return f"{split[process][part] / wall:.0%}" if process in split and wall > 0 else "-"

        rows.append([
            f.name, str(f.concurrency), f"{f.tokens_per_s:.1f}", f"{f.decode_tokens_per_s:.1f}",
            _fmt(f.speedup_vs_target_only, ".2f", "x"), _fmt(f.speedup_vs_hf_target_only, ".2f", "x"),
            _fmt(f.speedup_vs_llama_cpp_target_only, ".2f", "x"),
            _fmt(f.predicted_speedup, ".2f", "x"), _fmt(f.measured_over_predicted, ".2f"), f"{f.ttft_s * 1e3:.0f}",
            "/".join(f"{f.itl_ms[p]:.1f}" for p in ("p50", "p90", "p99")),
            _fmt(f.acceptance_rate, ".1%"), _fmt(f.mean_acceptance_length, ".2f"), _fmt(f.mean_drafted_length, ".2f"),
            _fmt(f.predraft_hit_rate, ".0%"), _fmt(f.mean_branches, ".1f"), speculation_off(f),
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


def concurrencies(result: BenchResult) -> list[int]:
    return sorted({f.concurrency for f in result.configs})


def best_lines(result: BenchResult) -> list[str]:
    """Per concurrency: the fastest configuration, and the fastest of ours against target-only."""
    lines = []
    for c in concurrencies(result):
        level = [f for f in result.configs if f.concurrency == c and math.isfinite(f.tokens_per_s)]
        if not level:
            continue
        best = max(level, key=lambda f: f.tokens_per_s)
        line = f"concurrency {c}: best {best.name} at {best.tokens_per_s:.1f} tokens/s"
        if best.speedup_vs_target_only is not None:
            line += f" ({best.speedup_vs_target_only:.2f}x target-only)"
        ours = [f for f in level if f.system == "specpipe"]
        if ours and best.system != "specpipe":
            ours_best = max(ours, key=lambda f: f.tokens_per_s)
            line += f"; of ours {ours_best.name} at {ours_best.tokens_per_s:.1f} tokens/s"
        lines.append(line)
    return lines


def describe(result: BenchResult) -> list[str]:
    """The lines under the table: setting, identity check, the best per concurrency, acceptance detail,
    the controller's speculation-off spells, warm-up."""
    s, m = result.settings, result.machine
    levels = concurrencies(result)
    reference = s.get("identity_reference", "target-only at concurrency 1")
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['date']}; "
             f"background load: {s.get('background_load', 'none')}",
             f"{s['prompts']} prompts x {s['repetitions']} repetition(s), {s['max_new_tokens']} new tokens at most, "
             f"greedy, dtype {s['dtype']}, {s['placement']}; warm-up: {s['warmup']} prompt(s) per configuration "
             "and concurrency, not counted",
             f"concurrency {', '.join(map(str, levels))}: at concurrency c the prompts run in rounds of c decoded at "
             "once (closed loop), every configuration in turn round by round, the concurrencies one after another "
             "(ascending); tokens/s = every token of the rounds / the rounds' walls; TTFT and ITL per request",
             f"greedy outputs token-identical across all specpipe configurations: "
             f"{'yes' if result.identical_greedy_outputs else 'NO'} (each against {reference})"]
    for entry in result.differing:
        prompts = ", ".join(map(str, entry["prompts"]))
        lines.append(f"{entry['config']} at concurrency {entry['concurrency']} differed from {reference} on "
                     f"prompt(s) {prompts}")
    lines.append("target wall: each instant of the target's timeline (all three processes traced) put in one bucket: "
                 "computing; idle while the draft drafted; or coordinator and IPC (its own message handling, idle "
                 "while the coordinator ran, while the draft handled messages, or while messages crossed)")
    lines += [f"{peer} identical to specpipe {reference}: {count} prompts"
              for peer, count in result.peers_identical.items()]
    if any(f.system == "llama.cpp" for f in result.configs):
        lines.append(f"llama.cpp: {s.get('llama_cpp', 'llama-server')}, one server per configuration pinned to our "
                     "workers' cores with a thread per core for each model, f16 GGUFs of the same checkpoints, prompts "
                     "sent as token ids, cache_prompt off; spec k=K is its speculative decoding (draft-simple) with "
                     f"draft max K, at its default --spec-draft-p-min and at {SWEPT_DRAFT_P_MIN} (each engine's best "
                     "configuration on the same cores); timed here as ours, from the request to each streamed token; "
                     "concurrency 1 only")
    if any(c > 1 for c in levels) and any(f.system == "transformers" for f in result.configs):
        lines.append("hf target-only at concurrency > 1: one batched generate per round (left-padded); hf assisted "
                     "runs at concurrency 1 only: transformers' assisted generation takes batch size 1")
    if any(c > 1 for c in levels):
        lines.append("predicted at concurrency > 1: the goodput controller's own prediction, time-weighted over the "
                     "rounds, where the scheduler makes one (else -)")
    lines += best_lines(result)
    for f in result.configs:
        events = f.speculation.get("speculation_off_events") or 0
        if events:
            seconds = f.speculation.get("speculation_off_s")
            spell = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
            lines.append(f"{f.name} at concurrency {f.concurrency}: the controller switched speculation off "
                         f"{events} times{spell}: drafting did not pay")
    for f in result.configs:
        if f.per_position_acceptance:
            positions = ", ".join(_fmt(rate, ".2f") for rate in f.per_position_acceptance)
            lines.append(f"{f.name} at concurrency {f.concurrency}: per-position acceptance {positions}; "
                         f"accepted-length histogram {f.accepted_length_histogram}")
    for f in result.configs:
        w = f.warmup
        if w["sequences"]:
            lines.append(f"warm-up {f.name} at concurrency {f.concurrency}: {w['tokens']} tokens in "
                         f"{w['wall_s']:.2f} s")
    return lines


def _clean(value):
    """JSON holds no NaN or infinity: a missing figure is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def as_json(result: BenchResult) -> dict:
    return _clean({"machine": result.machine, "settings": result.settings,
                   "identical_greedy_outputs": result.identical_greedy_outputs,
                   "differing": result.differing,
                   "peers_identical": result.peers_identical,
                   "configs": [dataclasses.asdict(f) for f in result.configs]})


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_json(result), indent=2, allow_nan=False, default=_finite))


def _finite(value):  # an object json cannot hold is left out as null
    return None


def write_report(result: BenchResult, directory: Path) -> list[Path]:
    """README-ready Markdown (report.md) and four PNG plots; returns the files written."""
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


def _names(configs: list[Figures]) -> list[str]:
    return list(dict.fromkeys(f.name for f in configs))


def _plots(result: BenchResult, directory: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--report draws its plots with matplotlib: pip install 'specpipe[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result.configs
    levels = concurrencies(result)
    lowest = [f for f in configs if f.concurrency == levels[0]]  # the per-configuration detail plots
    at_lowest = f" (concurrency {levels[0]})" if len(levels) > 1 or levels[0] != 1 else ""
    paths = []

    # tokens/s per configuration, one bar per concurrency
    names = _names(configs)
    figure, axes = plt.subplots(figsize=(max(9, 0.9 * len(names) * len(levels)), 4))
    width = 0.8 / len(levels)
    for offset, c in enumerate(levels):
        level = {f.name: f for f in configs if f.concurrency == c}
        xs = [i + (offset - (len(levels) - 1) / 2) * width for i, name in enumerate(names) if name in level]
        values = [level[name].tokens_per_s for name in names if name in level]
        colors = [PEER_COLORS.get(level[name].system) for name in names if name in level]
        bars = axes.bar(xs, values, width, label=f"concurrency {c}")
        for bar, color in zip(bars, colors):
            if color is not None and len(levels) == 1:
                bar.set_color(color)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel("tokens/s (wall clock, all requests)")
    axes.set_title(f"{result.machine['cpu']}, {result.machine['date']}")
    if len(levels) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / "tokens_per_s.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    # aggregate tokens/s against concurrency, a line per configuration
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name in names:
        points = sorted((f.concurrency, f.tokens_per_s) for f in configs if f.name == name)
        axes.plot([c for c, _ in points], [rate for _, rate in points], marker="o", label=name,
                  linestyle="--" if any(f.system != "specpipe" for f in configs if f.name == name) else "-")
    axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(c) for c in levels])
    axes.set_xlabel("concurrency (prompts decoded at once)")
    axes.set_ylabel("aggregate tokens/s")
    axes.set_title("throughput under a closed-loop load")
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / "tokens_per_s_by_concurrency.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    speculative = [f for f in lowest if f.accepted_length_histogram and f.mode == "overlap"]
    figure, axes = plt.subplots(figsize=(7, 4))
    for f in speculative:
        total = sum(f.accepted_length_histogram)
        axes.plot(range(len(f.accepted_length_histogram)), [c / total for c in f.accepted_length_histogram],
                  marker="o", label=f.name)
    axes.set_xlabel("drafted tokens accepted per verification" + at_lowest)
    axes.set_ylabel("share of verifications")
    if speculative:
        axes.legend()
    figure.tight_layout()
    paths.append(directory / "accepted_lengths.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    ours = [f for f in lowest if f.time_split_s and f.wall_s > 0]
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
    if at_lowest:
        axes.set_title("share of wall time" + at_lowest)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    paths.append(directory / "time_split.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths
