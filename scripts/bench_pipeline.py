"""Wall-clock tokens/s of target-only, serial and overlap through one running pipeline.

Same models, same machine, same run: the workers are started once (one core each on CPU) and
every configuration decodes the same held-out prompts, one prompt at a time, interleaved prompt by
prompt, after a warm-up prompt per configuration that is not counted. Greedy outputs are checked to be token-identical.

    python scripts/bench_pipeline.py                       # bundled pair, 16 prompts, 128 tokens, k=3,5
    python scripts/bench_pipeline.py --k 2,3,4 --prompts 32 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from pipeline.cli import default_dtype
from pipeline.generation import generate
from pipeline.launcher import ClusterConfig, LocalCluster, default_cores
from pipeline.scheduler import DecodeConfig
from workers.model.checkpoint import load_tokenizer
from workers.models import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.spec import WorkerSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", default="3,5")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--adaptive-k", default="3,5,8", help="also run overlap with an adaptive window up to these k")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    dtype = default_dtype("cpu") if args.dtype == "auto" else args.dtype
    tokenizer = load_tokenizer(TARGET_DIR)
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[: args.prompts + 1]]
    warmup, prompts = prompts[:1], prompts[1:]
    draft_cores, target_cores = default_cores(1, 2)
    config = ClusterConfig(target=WorkerSpec("target", str(TARGET_DIR), "", dtype=dtype, cores=target_cores, slots=1),
                           draft=WorkerSpec("draft", str(DRAFT_DIR), "", dtype=dtype, cores=draft_cores, slots=1))
    runs = [("target-only", 0)] + [(mode, int(k)) for k in args.k.split(",") for mode in ("serial", "overlap")]
    runs += [("overlap-adaptive", int(k)) for k in args.adaptive_k.split(",") if k]
    # Interleaved: each prompt goes through every configuration before the next prompt, so the
    # machine's slow and fast spells fall on all configurations alike.
    decodes = {(mode, k): DecodeConfig(mode.removesuffix("-adaptive"), max(k, 1), args.new_tokens,
                                       adaptive_k=mode.endswith("-adaptive")) for mode, k in runs}
    sequences = {run: [] for run in runs}
    walls = {run: 0.0 for run in runs}
    engines = {run: [] for run in runs}
    with LocalCluster(config) as cluster:
        for run in runs:
            generate(cluster.transport, warmup, decodes[run], cluster.limits())  # warm-up, not counted
        for prompt in prompts:
            for run in runs:
                began = time.perf_counter()
                done, engine = generate(cluster.transport, [prompt], decodes[run], cluster.limits())
                walls[run] += time.perf_counter() - began
                sequences[run] += done
                engines[run].append(engine)
    rows, outputs = [], {}
    for run in runs:
        mode, k = run
        wall, seqs = walls[run], sequences[run]
        outputs[run] = [s.generated for s in seqs]
        tokens = sum(len(s.generated) for s in seqs)
        drafted = sum(s.stats.drafted for s in seqs)
        accepted = sum(s.stats.accepted for s in seqs)
        verifications = sum(s.stats.verifications for s in seqs)
        hits = sum(s.stats.predraft_hits for s in seqs)
        alt_hits = sum(s.stats.alt_hits for s in seqs)
        misses = sum(s.stats.predraft_misses for s in seqs)

        def total(attribute: str, role: str) -> float:
            return sum(getattr(e, attribute)[role] for e in engines[run])

        rows.append({
            "mode": mode, "k": k, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_acceptance_length": (accepted + verifications) / verifications if verifications else None,
            "predraft_hit_rate": hits / (hits + misses) if hits + misses else None,
            "alt_hit_share": alt_hits / hits if hits else None,
            "target_busy_share": total("busy_s", "target") / wall,
            "draft_busy_share": total("busy_s", "draft") / wall,
            "coordinator_share": sum(e.coordinator_s for e in engines[run]) / wall,
            "target_ipc_share": total("overhead_s", "target") / wall,  # on the critical path
            "draft_ipc_share": total("overhead_s", "draft") / wall,
        })
    baseline = rows[0]["tokens_per_s"]
    serial = {row["k"]: row["tokens_per_s"] for row in rows if row["mode"] == "serial"}
    identical = all(out == outputs[("target-only", 0)] for out in outputs.values())
    print("columns: tokens/s; speedups; acceptance rate; mean acceptance length; pre-draft hit rate; busy shares of "
          "wall time; coordinator share; round trip minus compute per worker (IPC + serialization)")
    print(f"machine: {platform.processor() or platform.machine()}, {len(prompts)} held-out prompts x "
          f"{args.new_tokens} tokens, one prompt at a time, one core per worker, dtype {dtype}")
    print(f"{'config':<16}{'tok/s':>8}{'vs t-only':>10}{'vs serial':>10}{'accept':>8}{'mean len':>9}"
          f"{'hit':>6}{'target busy':>12}{'draft busy':>11}{'coord':>7}{'ipc t/d':>12}")
    for row in rows:
        name = row["mode"] if row["mode"] == "target-only" else f"{row['mode']} k={row['k']}"
        vs_serial = row["tokens_per_s"] / serial[row["k"]] if row["mode"] == "overlap" else None
        if row["mode"] == "overlap-adaptive":
            name = f"overlap k<={row['k']}"

        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"

        print(f"{name:<16}{row['tokens_per_s']:>8.1f}{row['tokens_per_s'] / baseline:>9.2f}x"
              f"{fmt(vs_serial, '>9.2f')}{'x' if vs_serial else ' '}{fmt(row['acceptance_rate'], '>8.1%')}"
              f"{fmt(row['mean_acceptance_length'], '>9.2f')}{fmt(row['predraft_hit_rate'], '>6.0%')}"
              f"{row['target_busy_share']:>12.0%}{row['draft_busy_share']:>11.0%}{row['coordinator_share']:>7.1%}"
              f"{row['target_ipc_share']:>6.1%}/{row['draft_ipc_share']:.1%}")
    for row in rows:
        if row["alt_hit_share"] is not None:
            window = f"k<={row['k']}" if row["mode"] == "overlap-adaptive" else f"k={row['k']}"
            print(f"overlap {window}: {row['alt_hit_share']:.0%} of hits came from rejected-at-j speculations")
    print(f"greedy outputs identical across all configurations: {identical}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"dtype": dtype, "prompts": len(prompts), "new_tokens": args.new_tokens, "rows": rows,
                       "identical_greedy_outputs": identical}, out, indent=2)


if __name__ == "__main__":
    main()
