"""Random-weight Hugging Face checkpoints shaped like public models, and a draft for each that agrees with it.

Real checkpoints cannot be downloaded here, but a decode step's cost depends on a model's shape and weight
format, not on what its weights learnt: a random-weight Llama-3.2-1B streams the same 2 GB per token as the
real one. So performance is measured on these (docs/benchmarks.md), and the tests load small ones.

    python scripts/make_shaped_checkpoint.py --shape llama-3.2-1b --vocab 49152 --out /tmp/llama1b
    python scripts/make_shaped_checkpoint.py --shape smollm2-135m --out /tmp/smol135m --dtype float16

writes OUT/target and OUT/draft. The draft is the target's first --draft-layers layers with its embeddings,
final norm and head, so it is a real draft: its greedy tokens agree with the target's as far as the deeper
layers leave what the first ones computed. Random deeper layers would replace it entirely, so their output
projections (o_proj, down_proj) are scaled by --deep-scale: they perturb the residual stream instead. The
script measures and prints the agreement it got (teacher-forced greedy agreement over random prompts).

The tokenizer is the bundled pair's (a 4096-token byte-level BPE trained on Python code) with its chat
template; a shape's larger vocabulary keeps its embedding rows and head columns (ids past the tokenizer's
decode to nothing), so the bytes a step reads are the public model's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.bundled import TARGET_DIR  # noqa: E402

CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_positions: int = 8192
    extra: dict = field(default_factory=dict)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
SHAPES = {  # from each model's published config.json
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 128256, True, 500000.0, LLAMA3_SCALING, 131072),
    "llama-3.2-3b": Shape(3072, 28, 24, 8, 8192, 128256, True, 500000.0, LLAMA3_SCALING, 131072),
    "llama-3.1-8b": Shape(4096, 32, 32, 8, 14336, 128256, False, 500000.0,
                          {**LLAMA3_SCALING, "factor": 8.0}, 131072),
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 49152, True, 100000.0, None, 8192),
    "smollm2-360m": Shape(960, 32, 15, 5, 2560, 49152, True, 100000.0, None, 8192),
    "smollm2-1.7b": Shape(2048, 24, 32, 32, 8192, 49152, True, 130000.0, None, 8192),
}


def config_json(shape: Shape, layers: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads, "vocab_size": shape.vocab, "tie_word_embeddings": shape.tied,
        "rms_norm_eps": 1e-5, "rope_theta": shape.rope_theta, "rope_scaling": shape.rope_scaling,
        "max_position_embeddings": shape.max_positions, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": dtype,
    }


def random_weights(shape: Shape, dtype: torch.dtype, deep_scale: float, draft_layers: int, seed: int):
    """(name, tensor) of the target, one at a time: N(0, 0.02) matrices, unit norms; output projections of
    layers past the draft's scaled by deep_scale."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = shape.hidden // shape.heads

    def matrix(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * (0.02 * scale)).to(dtype)

    yield "model.embed_tokens.weight", matrix(shape.vocab, shape.hidden)
    for i in range(shape.layers):
        scale = 1.0 if i < draft_layers else deep_scale
        prefix = f"model.layers.{i}."
        yield prefix + "self_attn.q_proj.weight", matrix(shape.heads * head_dim, shape.hidden)
        yield prefix + "self_attn.k_proj.weight", matrix(shape.kv_heads * head_dim, shape.hidden)
        yield prefix + "self_attn.v_proj.weight", matrix(shape.kv_heads * head_dim, shape.hidden)
        yield prefix + "self_attn.o_proj.weight", matrix(shape.hidden, shape.heads * head_dim, scale)
        yield prefix + "mlp.gate_proj.weight", matrix(shape.ffn, shape.hidden)
        yield prefix + "mlp.up_proj.weight", matrix(shape.ffn, shape.hidden)
        yield prefix + "mlp.down_proj.weight", matrix(shape.hidden, shape.ffn, scale)
        yield prefix + "input_layernorm.weight", torch.ones(shape.hidden, dtype=dtype)
        yield prefix + "post_attention_layernorm.weight", torch.ones(shape.hidden, dtype=dtype)
    yield "model.norm.weight", torch.ones(shape.hidden, dtype=dtype)
    if not shape.tied:
        yield "lm_head.weight", matrix(shape.vocab, shape.hidden)


def write_shards(tensors, directory: Path) -> int:
    """Writes the tensors as model-0000N-of-0000M.safetensors of at most SHARD_BYTES (one model.safetensors when
    they fit) with the index Hugging Face writes; returns the bytes written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + size > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += size
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return sizes[0]
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    return sum(sizes)


def write_tokenizer(directory: Path) -> None:
    shutil.copy(TARGET_DIR / "tokenizer.json", directory / "tokenizer.json")
    settings = json.loads((TARGET_DIR / "tokenizer_config.json").read_text())
    settings["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def write_checkpoint(directory: Path, config: dict, tensors) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(directory)
    return write_shards(tensors, directory)


def agreement(target_dir: Path, draft_dir: Path, prompts: int, length: int, seed: int) -> float:
    """Teacher-forced greedy agreement: over random token sequences, how often the draft's next-token argmax
    is the target's."""
    from workers.model import ModelRunner

    target = ModelRunner.from_checkpoint(target_dir, dtype="fp16-weights", max_seq_len=length)
    draft = ModelRunner.from_checkpoint(draft_dir, dtype="fp16-weights", max_seq_len=length)
    generator = torch.Generator().manual_seed(seed)
    same = total = 0
    for _ in range(prompts):
        ids = torch.randint(0, 4096, (length,), generator=generator).tolist()  # the tokenizer's own ids
        for runner in (target, draft):
            runner.truncate(0, 0)
        want = target.forward(ids, 0, prompt_pass=True, last=length).argmax(-1)
        got = draft.forward(ids, 0, prompt_pass=True, last=length).argmax(-1)
        same += int((want == got).sum())
        total += length
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/target and OUT/draft")
    parser.add_argument("--vocab", type=int, help="override the shape's vocabulary (e.g. 49152 as SmolLM2's)")
    parser.add_argument("--layers", type=int, help="override the shape's layer count (small checkpoints for tests)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--deep-scale", type=float, default=0.1,
                        help="scale of the output projections of the layers past the draft's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=int, default=4, help="random prompts for the agreement check (0: none)")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    if args.vocab:
        shape = Shape(**{**shape.__dict__, "vocab": args.vocab})
    if args.layers:
        shape = Shape(**{**shape.__dict__, "layers": args.layers})
    dtype = getattr(torch, args.dtype)
    began = time.perf_counter()
    tensors = list(random_weights(shape, dtype, args.deep_scale, args.draft_layers, args.seed))
    target_bytes = write_checkpoint(args.out / "target", config_json(shape, shape.layers, args.dtype), tensors)
    draft_shape = Shape(**{**shape.__dict__, "layers": args.draft_layers})
    draft_tensors = [(name, tensor) for name, tensor in tensors
                     if not name.startswith("model.layers.") or int(name.split(".")[2]) < args.draft_layers]
    draft_bytes = write_checkpoint(args.out / "draft", config_json(draft_shape, args.draft_layers, args.dtype),
                                   draft_tensors)
    print(f"{args.shape}: target {target_bytes / 2**30:.2f} GiB ({target_bytes // 2 / 1e9:.2f} B parameters), "
          f"draft {draft_bytes / 2**30:.2f} GiB ({args.draft_layers} layers) in {args.out}, "
          f"{time.perf_counter() - began:.0f} s")
    if args.check:
        rate = agreement(args.out / "target", args.out / "draft", args.check, 128, args.seed)
        print(f"greedy agreement, draft against target (teacher-forced, {args.check} x 128 tokens): {rate:.1%}")


if __name__ == "__main__":
    main()
