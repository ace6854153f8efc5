"""Measures how well a draft/target pair speculates, through specpipe's own runner (pipeline.distill.evaluate).

Greedy agreement, acceptance rate and mean acceptance length at each k, per-position acceptance and the
draft's single-token decode cost against the target's, on target-written continuations of the prompts.
The same as `specpipe distill --eval-only`, with any list of k.

    python scripts/eval_pair.py                      # bundled pair, held-out stdlib prompts, k = 1,3,5
    python scripts/eval_pair.py --prompts-file workers/bundled/heldout_packages_prompts.jsonl --k 1,3,5,8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.distill.evaluate import evaluate_pair
from pipeline.prompts import read_prompts_file
from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=Path, default=DRAFT_DIR)
    parser.add_argument("--target", type=Path, default=TARGET_DIR)
    parser.add_argument("--prompts-file", type=Path, default=HELDOUT_PROMPTS)
    parser.add_argument("--prompts", type=int, default=64, help="how many prompts of the file to use")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", default="1,3,5", help="comma-separated window sizes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    texts = read_prompts_file(args.prompts_file)[: args.prompts]
    report = evaluate_pair(args.draft, args.target, texts, args.new_tokens, [int(k) for k in args.k.split(",")])
    print(f"prompts: {args.prompts_file}")
    for line in report.lines():
        print(line)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
