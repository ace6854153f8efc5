"""Writes the held-out code prompt set shipped with the bundled pair.

Each prompt is a run of whole lines (about --chars characters) from one of the held-out standard
library files listed in workers/bundled/target/heldout_files.txt, at a seeded random line. Machine-generated
character-map codec tables (encodings/cp*.py and the like, made by gencodec.py) are left out: they
are nearly a lookup and would flatter acceptance. Output:
one JSON string per line, the format `specpipe launch --prompts-file` reads.

    python scripts/make_heldout_prompts.py          # rewrites workers/bundled/heldout_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "workers" / "models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--chars", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=MODELS / "heldout_prompts.jsonl")
    args = parser.parse_args()

    files = (MODELS / "target" / "heldout_files.txt").read_text().split()
    sources = [(args.stdlib / name).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
               for name in files]
    sources = [
        lines for lines in sources
        if sum(map(len, lines)) > 4 * args.chars and not any("generated from" in line and "gencodec" in line
                                                                 for line in lines[:5])
    ]
    rng = random.Random(args.seed)
    prompts = []
    while len(prompts) < args.count:
        lines = rng.choice(sources)
        start = rng.randrange(len(lines))
        prompt = ""
        for line in lines[start:]:
            if len(prompt) >= args.chars:
                break
            prompt += line
        if len(prompt) >= args.chars // 2 and prompt.strip():
            prompts.append(prompt)
    args.out.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts from {len(sources)} held-out files to {args.out}")


if __name__ == "__main__":
    main()
