"""Single-token decode and k-token verification speed of our runner against transformers.

Both models hold the same random weights (a Llama of --layers x --hidden written to a temporary
checkpoint); both run greedy decode with their KV cache on one CPU thread (--threads).

    python scripts/bench_runner.py            # 6 layers, 384 wide, as issue 2 asks
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from workers.model import ModelRunner


def seconds_per_call(contender, steps: int) -> float:
    reset, step = contender
    reset()  # prefill, not timed
    begin = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - begin) / steps


def interleaved_medians(steps: int, repeats: int, **contenders) -> dict[str, float]:
    """Median seconds per call of each contender, measured in alternation so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats + 1):
        for name, step in contenders.items():
            samples[name].append(seconds_per_call(step, steps))
    return {name: statistics.median(values[1:]) for name, values in samples.items()}  # first round warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verify-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        vocab_size=args.vocab, max_position_embeddings=1024,
    )
    hf_model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, args.vocab, (args.prompt_len,))
    total = args.prompt_len + args.steps + args.verify_k + 1

    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        runner = ModelRunner.from_checkpoint(directory, max_seq_len=total)

    # --- ours: one-token decode and k-token verification ---------------------------------------
    def ours_prefill() -> None:
        runner.truncate(0, 0)
        runner.forward(prompt, 0)

    def ours_decode(i: int) -> None:
        runner.forward(prompt[i : i + 1], args.prompt_len + i)

    def ours_verify(i: int) -> None:
        runner.truncate(0, args.prompt_len)  # the O(1) rollback a rejected window costs
        runner.forward(prompt[: args.verify_k], args.prompt_len)

    # --- transformers: one-token decode with its DynamicCache ------------------------------------
    state: dict = {}

    @torch.inference_mode()
    def hf_prefill() -> None:
        state["cache"] = DynamicCache(config=config)
        hf_model(prompt[None], past_key_values=state["cache"], use_cache=True)

    @torch.inference_mode()
    def hf_decode(i: int) -> None:
        out = hf_model(prompt[None, i : i + 1], past_key_values=state["cache"], use_cache=True)
        out.logits[0, -1].argmax()

    medians = interleaved_medians(
        args.steps,
        args.repeats,
        ours_decode=(ours_prefill, ours_decode),
        ours_verify=(ours_prefill, ours_verify),
        hf_decode=(hf_prefill, hf_decode),
    )
    ours_decode_s, ours_verify_s, hf_decode_s = medians["ours_decode"], medians["ours_verify"], medians["hf_decode"]

    print(f"model: {args.layers} layers x {args.hidden} wide, vocab {args.vocab}, "
          f"{sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M params, fp32, {args.threads} thread(s), "
          f"context {args.prompt_len} tokens")
    print(f"transformers LlamaForCausalLM decode: {hf_decode_s * 1e3:7.3f} ms/token")
    print(f"specpipe ModelRunner decode:          {ours_decode_s * 1e3:7.3f} ms/token")
    print(f"speedup over transformers:            {hf_decode_s / ours_decode_s:7.2f}x")
    print(f"verify {args.verify_k} tokens in one pass:       {ours_verify_s * 1e3:7.3f} ms "
          f"= {ours_verify_s / ours_decode_s:.2f} single-token steps (vs {args.verify_k} if decoded one by one)")


if __name__ == "__main__":
    main()
