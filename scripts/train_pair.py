"""Trains specpipe's bundled draft/target pair: the target's own pre-training, then `specpipe distill`.

    python scripts/build_corpus.py --out /work/corpus                 # the corpus, split by package
    python scripts/train_pair.py --corpus /work/corpus/train --out runs/pair --export workers/bundled

Phases, each resumable (state is saved under --out and a rerun continues where it stopped):
  1. tokenizer: byte-level BPE (tokenizers), trained on the training files only;
  2. target:    a Llama model trained on next-token prediction; the checkpoint with the best
                held-out loss is kept and saved as runs/pair/target;
  3. draft:     `specpipe distill` for that target (pipeline.distill): a much smaller Llama that
                minimises KL(target || draft) over the corpus and over text the target itself wrote.

Corpus: every *.py file under --corpus (scripts/build_corpus.py lays one out: permissively licensed
packages and the standard library, held-out packages apart); without --corpus, the standard library of
this interpreter less its tests. A hash of each text holds 2 % of the files back for the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import ModelsConfig, PromptsConfig
from pipeline.distill.command import run_distill
from pipeline.distill.config import DistillConfig, DraftShape, EvalConfig, TrainingConfig
from pipeline.distill.corpus import read_corpus, sample_windows, token_stream
from pipeline.distill.train import learning_rate

EOS = "<|endoftext|>"


# --- tokenizer ----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )
    wrapped.save_pretrained(out)
    return wrapped


# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


TARGET = Shape(hidden=512, layers=7, heads=8, kv_heads=4, ffn=1536)


def llama_config(shape: Shape, vocab_size: int, context: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=context,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=0.02,
    )


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, length: int, device: torch.device, max_windows: int = 256) -> float:
    """Mean next-token loss over consecutive (non-overlapping) held-out windows."""
    model.eval()
    windows = stream[: (stream.numel() - 1) // length * length + 1]
    losses, count = 0.0, 0
    starts = list(range(0, windows.numel() - length - 1, length))[:max_windows]
    for i in range(0, len(starts), 32):
        chunk = torch.stack([windows[s : s + length + 1] for s in starts[i : i + 32]]).long().to(device)
        with autocast(device):
            logits = model(chunk[:, :-1]).logits.float()
        losses += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return losses / max(count, 1)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# --- training loops -----------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    steps: int
    batch: int
    length: int
    lr: float
    warmup: int
    eval_every: int
    max_minutes: float


def run_phase(phase: Phase, model, loss_fn, train_stream, heldout_stream, device, state_dir: Path, seed: int):
    """A resumable training loop; keeps the weights with the best held-out loss."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file, best_file = state_dir / "state.pt", state_dir / "best.pt"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=phase.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    step, best = 0, float("inf")
    if state_file.exists():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, best = int(saved["step"]), float(saved["best"])
        print(f"[train] {phase.name}: resuming at step {step} (best held-out loss {best:.4f})")
    if step >= phase.steps:
        return best

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best},
                   state_file)

    model.train()
    began, tokens_seen = time.perf_counter(), 0
    bar = tqdm(total=phase.steps, initial=step, desc=phase.name, dynamic_ncols=True)
    while step < phase.steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # resumes reproduce the same batches
        # windows of length + 1 tokens: inputs and their next tokens
        batch = sample_windows(train_stream, phase.batch, phase.length + 1, generator).to(device, non_blocking=True)
        # Progress is by steps, or by time when --max-minutes binds first, so the decay always completes.
        progress = max(step / phase.steps, (time.perf_counter() - began) / (phase.max_minutes * 60))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, phase.lr, phase.warmup)
        with autocast(device):
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += batch[:, 1:].numel()
        elapsed = time.perf_counter() - began
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}")
        out_of_time = elapsed > phase.max_minutes * 60
        if step % phase.eval_every == 0 or step == phase.steps or out_of_time:
            held = heldout_loss(model, heldout_stream, phase.length, device)
            if held < best:
                best = held
                torch.save(model.state_dict(), best_file)
            tqdm.write(f"[train] {phase.name} step {step}: train loss {loss.item():.4f}, held-out loss {held:.4f} "
                       f"(best {best:.4f}), {tokens_seen / elapsed:,.0f} tokens/s")
            save()
        if out_of_time:
            tqdm.write(f"[train] {phase.name}: --max-minutes reached at step {step}; rerun to continue")
            break
    bar.close()
    model.load_state_dict(torch.load(best_file, map_location=device, weights_only=True))
    return best


def save_checkpoint(model, tokenizer, directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pair"), help="working directory (resumable state)")
    parser.add_argument("--export", type=Path, help="also write the final draft/ and target/ checkpoints here")
    parser.add_argument("--corpus", type=Path, action="append", default=[],
                        help="a directory of *.py files; repeat for several (default: the standard library)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--target-steps", type=int, default=800)
    parser.add_argument("--draft-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--generations", type=int, default=12288, help="target continuations to distil on")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="for the target's training")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for testing the script itself")
    args = parser.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = read_corpus(args.corpus)
    print(f"[train] device {device}, torch {torch.__version__}, corpus {', '.join(corpus.sources)}: "
          f"{len(corpus.train)} files ({sum(map(len, corpus.train)) / 1e6:.1f} MB), {len(corpus.validation)} held back")

    tokenizer_dir = args.out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(corpus.train, args.vocab_size, tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    streams_file = args.out / "streams.pt"
    if streams_file.exists():
        streams = torch.load(streams_file, weights_only=True)
    else:
        streams = {"train": token_stream(tokenizer, corpus.train, eos_id),
                   "heldout": token_stream(tokenizer, corpus.validation, eos_id)}
        torch.save(streams, streams_file)
    train_stream, heldout_stream = streams["train"], streams["heldout"]
    print(f"[train] tokens: {train_stream.numel():,} train, {heldout_stream.numel():,} held-out")

    from transformers import LlamaForCausalLM

    target_shape, draft_shape = TARGET, DraftShape(layers=2, width=256)
    if args.tiny:
        target_shape, draft_shape = Shape(64, 2, 4, 2, 128), DraftShape(layers=1, width=32)
    target = LlamaForCausalLM(llama_config(target_shape, len(tokenizer), args.context, eos_id)).to(device)

    def next_token_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = target(batch[:, :-1]).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    target_phase = Phase("target", args.target_steps, args.batch, args.seq_len, 1.5e-3, 200,
                         max(50, args.target_steps // 12), args.max_minutes)
    target_best = run_phase(target_phase, target, next_token_loss, train_stream, heldout_stream, device,
                            args.out / "target-state", args.seed)
    target_dir = args.out / "target"
    meta = {"corpus": list(corpus.sources), "seed": args.seed, "device": str(device), "torch": torch.__version__,
            "train_files": len(corpus.train), "train_tokens": train_stream.numel(), "role": "target",
            "shape": asdict(target_shape), "steps": args.target_steps, "heldout_loss": round(target_best, 4),
            "params": sum(p.numel() for p in target.parameters())}
    save_checkpoint(target, tokenizer, target_dir, meta)

    # The draft: `specpipe distill` for the target just saved, on the same corpus.
    config = DistillConfig(
        models=ModelsConfig(target_dir=target_dir), out_dir=args.out / "draft", corpus=tuple(args.corpus),
        shape=draft_shape, training=TrainingConfig(steps=args.draft_steps, batch_size=args.batch,
                                                    seq_len=args.seq_len, learning_rate=3e-3,
                                                    generations=args.generations, seed=args.seed + 1),
        evaluation=EvalConfig(prompts=PromptsConfig(count=4 if args.tiny else 64),
                              max_new_tokens=16 if args.tiny else 128))
    run_distill(config)
    if args.export:
        for name in ("target", "draft"):
            shutil.copytree(args.out / name, args.export / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("state"))
        print(f"[train] exported draft/ and target/ to {args.export}")
    print(f"[train] done: target best held-out {target_best:.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
