"""The runner on a CUDA GPU: bundled pair logits against transformers on the same GPU, and decode speed.

    python scripts/check_cuda.py
"""

import time

import torch
from transformers import AutoModelForCausalLM

from workers.bundled import DRAFT_DIR, TARGET_DIR
from workers.model import ModelRunner


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA GPU here"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ids = torch.randint(10, 4000, (200,), generator=torch.Generator().manual_seed(0))
    for directory in (DRAFT_DIR, TARGET_DIR):
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            expected = hf(ids[None].cuda()).logits[0].float()
        for dtype in ("float32", "bfloat16"):
            runner = ModelRunner.from_checkpoint(directory, device="cuda", dtype=dtype)
            got = runner.forward(ids, 0)
            agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
            runner.truncate(0, 100)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for i in range(100):
                runner.forward([int(ids[i])], 100 + i)
            torch.cuda.synchronize()
            per_token = (time.perf_counter() - began) / 100 * 1e3
            print(f"{directory.name:6} {dtype:8}: max |logit diff| {(got - expected).abs().max().item():.2e}, "
                  f"argmax agreement {agree:.1%}, decode {per_token:.2f} ms/token (eager)")


if __name__ == "__main__":
    main()
