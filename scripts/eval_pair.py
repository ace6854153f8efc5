"""Measures how well a draft/target pair speculates, through specpipe's own runner.

For each held-out prompt the target writes a greedy continuation. On those prefixes (produced by
the target) it reports:
  - agreement: how often the draft's argmax equals the target's next token;
  - greedy speculation at window k: acceptance rate (accepted / drafted), mean acceptance length
    (accepted + 1 bonus token per verification), per-position acceptance and the accepted-length
    histogram. Greedy speculative decoding emits exactly the target's greedy tokens, so it is
    simulated here against the recorded continuation;
  - single-token decode time of each model on --threads CPU threads, and their ratio.

    python scripts/eval_pair.py                      # bundled pair, held-out prompts, k = 5
    python scripts/eval_pair.py --k 1,3,5,8 --draft DIR --target DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer

MODELS = Path(__file__).resolve().parent.parent / "workers" / "models"


def greedy_continuation(target: ModelRunner, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    target.truncate(0, 0)
    logits = target.forward(prompt, 0)
    out: list[int] = []
    while len(out) < new_tokens:
        token = int(logits[-1].argmax())
        out.append(token)
        if token in eos:
            break
        logits = target.forward([token], len(prompt) + len(out) - 1)
    return out


def agreement(draft: ModelRunner, prompt: list[int], continuation: list[int]) -> tuple[int, int]:
    """(matches, positions): draft argmax vs the target's token, teacher-forced on the target's text."""
    draft.truncate(0, 0)
    logits = draft.forward(prompt + continuation[:-1], 0)
    predicted = logits[len(prompt) - 1 :].argmax(-1).tolist()
    return sum(p == t for p, t in zip(predicted, continuation)), len(continuation)


def speculate(draft: ModelRunner, prompt: list[int], continuation: list[int], k: int) -> list[tuple[int, int]]:
    """Greedy speculation against the recorded target continuation: (drafted, accepted) per verification."""
    draft.truncate(0, 0)
    draft.forward(prompt[:-1], 0)
    pending = [prompt[-1]]  # tokens the target has emitted that the draft has not yet read
    produced, windows = 0, []
    while produced < len(continuation):
        window = min(k, len(continuation) - produced)
        cached = draft.lengths[0]
        drafted: list[int] = []
        logits = draft.forward(pending, cached)
        for _ in range(window):
            drafted.append(int(logits[-1].argmax()))
            if len(drafted) < window:
                logits = draft.forward(drafted[-1:], draft.lengths[0])
        truth = continuation[produced : produced + window]
        accepted = 0
        while accepted < window and drafted[accepted] == truth[accepted]:
            accepted += 1
        windows.append((window, accepted))
        emitted = continuation[produced : produced + accepted + 1]  # accepted tokens + the target's own
        produced += len(emitted)
        # keep the draft's cache up to the last accepted token it has read; feed the rest next time
        read = cached + len(pending)
        kept_drafted = min(accepted, window - 1)
        draft.truncate(0, read + kept_drafted)
        pending = emitted[kept_drafted:]
    return windows


def decode_ms(runner: ModelRunner, prompt: list[int], steps: int = 48) -> float:
    runner.truncate(0, 0)
    runner.forward(prompt, 0)
    begin = time.perf_counter()
    for i in range(steps):
        runner.forward([prompt[i % len(prompt)]], len(prompt) + i)
    return (time.perf_counter() - begin) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=MODELS / "draft")
    parser.add_argument("--target", type=Path, default=MODELS / "target")
    parser.add_argument("--prompts-file", type=Path, default=MODELS / "heldout_prompts.jsonl")
    parser.add_argument("--prompts", type=int, default=64, help="how many prompts of the file to use")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", default="5", help="comma-separated window sizes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.target)
    draft = ModelRunner.from_checkpoint(args.draft)
    target = ModelRunner.from_checkpoint(args.target)
    eos = set(target.config.eos_token_ids)
    texts = [json.loads(line) for line in args.prompts_file.read_text().splitlines()][: args.prompts]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    continuations = [greedy_continuation(target, p, args.new_tokens, eos) for p in prompts]

    matches = positions = 0
    for prompt, continuation in zip(prompts, continuations):
        m, n = agreement(draft, prompt, continuation)
        matches += m
        positions += n
    report: dict = {"prompts": len(prompts), "target_tokens": positions, "agreement": matches / positions, "k": {}}
    print(f"pair: draft {args.draft} ({draft.config.num_params / 1e6:.1f}M params), "
          f"target {args.target} ({target.config.num_params / 1e6:.1f}M params)")
    print(f"{len(prompts)} held-out prompts, {positions} target tokens (greedy, up to {args.new_tokens} per prompt)")
    print(f"greedy agreement (draft argmax == target token): {matches / positions:.1%}")

    for k in (int(x) for x in args.k.split(",")):
        windows = [w for p, c in zip(prompts, continuations) for w in speculate(draft, p, c, k)]
        drafted = sum(w for w, _ in windows)
        accepted = sum(a for _, a in windows)
        histogram = [sum(1 for w, a in windows if a == n) for n in range(k + 1)]
        reached = [sum(1 for w, a in windows if w > i and a >= i) for i in range(k)]
        taken = [sum(1 for w, a in windows if w > i and a > i) for i in range(k)]
        per_position = [t / r if r else 0.0 for t, r in zip(taken, reached)]
        figures = {
            "verifications": len(windows),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted,
            "mean_acceptance_length": (accepted + len(windows)) / len(windows),
            "per_position_acceptance": per_position,
            "accepted_length_histogram": histogram,
        }
        report["k"][k] = figures
        print(f"k={k}: acceptance rate {figures['acceptance_rate']:.1%}, mean acceptance length "
              f"{figures['mean_acceptance_length']:.2f} (accepted + 1 per verification, {len(windows)} verifications)")
        print(f"     per-position acceptance: {', '.join(f'{p:.2f}' for p in per_position)}")
        print(f"     accepted-length histogram (0..{k}): {histogram}")

    samples = {"draft": [], "target": []}
    for _ in range(5):  # interleaved, so machine noise hits both alike
        for name, runner in (("draft", draft), ("target", target)):
            samples[name].append(decode_ms(runner, prompts[0]))
    draft_ms, target_ms = statistics.median(samples["draft"]), statistics.median(samples["target"])
    report.update(draft_decode_ms=draft_ms, target_decode_ms=target_ms, threads=args.threads)
    print(f"single-token decode on {args.threads} CPU thread(s): draft {draft_ms:.2f} ms, target {target_ms:.2f} ms "
          f"(draft = 1/{target_ms / draft_ms:.1f} of target)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
