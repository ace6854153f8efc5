"""Trains specpipe's bundled draft/target pair on the Python standard library.

    python scripts/train_pair.py --out runs/pair            # CUDA if present, else CPU
    python scripts/train_pair.py --out runs/pair --export workers/models

Phases, each resumable (state is saved under --out and a rerun continues where it stopped):
  1. tokenizer: byte-level BPE (tokenizers), trained on the training files only;
  2. target:    a Llama model trained on next-token prediction; the checkpoint with the best
                held-out loss is kept;
  3. draft:     a much smaller Llama distilled from the target: it minimises KL(target || draft)
                over both corpus text and text the target itself generated (the prefixes the draft
                will see at inference), so that draft and target agree as often as possible.

Corpus: every *.py file of the standard library of the interpreter that runs this script (or
--stdlib), except site-packages and tests (any path component test, tests or idle_test, and
files named test_*.py). Files are split into train and held-out by a hash of their relative
path; the held-out list is written next to the checkpoints (heldout_files.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

EOS = "<|endoftext|>"
TEST_DIRS = {"test", "tests", "idle_test"}


# --- corpus -------------------------------------------------------------------------------------


def corpus_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        parts = set(relative.parts[:-1])
        if "site-packages" in parts or parts & TEST_DIRS or relative.name.startswith("test_"):
            continue
        files.append(relative)
    return files


def is_heldout(relative: Path, heldout_percent: int) -> bool:
    bucket = int(hashlib.sha256(relative.as_posix().encode()).hexdigest(), 16) % 100
    return bucket < heldout_percent


def split_corpus(stdlib: Path, heldout_percent: int) -> tuple[list[Path], list[Path]]:
    files = corpus_files(stdlib)
    train = [f for f in files if not is_heldout(f, heldout_percent)]
    heldout = [f for f in files if is_heldout(f, heldout_percent)]
    return train, heldout


def read_text(stdlib: Path, relative: Path) -> str:
    return (stdlib / relative).read_text(encoding="utf-8", errors="replace")


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


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream of ids, each followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


TARGET = Shape(hidden=512, layers=7, heads=8, kv_heads=4, ffn=1536)
DRAFT = Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=704)


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


def sample_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([stream[s : s + length + 1] for s in starts.tolist()]).long()


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


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
        batch = sample_windows(train_stream, phase.batch, phase.length, generator).to(device, non_blocking=True)
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


@torch.no_grad()
def target_generations(target, train_stream, count: int, prompt_len: int, new_tokens: int, device, seed: int,
                       batch: int = 512) -> torch.Tensor:
    """Continuations written by the target (half greedy, half sampled), prompt included, as one stream."""
    target.eval()
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    for i in tqdm(range(0, count, batch), desc="target generations", dynamic_ncols=True):
        prompts = sample_windows(train_stream, min(batch, count - i), prompt_len - 1, generator).to(device)
        sampled = (i // batch) % 2 == 1
        with autocast(device):
            out = target.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=sampled, temperature=1.0 if sampled else None, top_k=0 if sampled else None,
                top_p=1.0 if sampled else None,
            )
        pieces.append(out.flatten().cpu().to(torch.int32))
    target.train()
    return torch.cat(pieces)


@torch.no_grad()
def greedy_agreement(target, draft, heldout_stream, device, prompts: int = 64, prompt_len: int = 64,
                     new_tokens: int = 128, seed: int = 0) -> float:
    """How often the draft's argmax equals the target's greedy token, on target-written continuations
    of held-out prompts (a quick check; scripts/eval_pair.py measures it through specpipe's runner)."""
    generator = torch.Generator().manual_seed(seed)
    batch = sample_windows(heldout_stream, prompts, prompt_len - 1, generator).to(device)
    with autocast(device):
        sequences = target.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
        draft_choice = draft(sequences[:, :-1]).logits.argmax(-1)[:, prompt_len - 1 :]
    return (draft_choice == sequences[:, prompt_len:]).float().mean().item()


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
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--heldout-percent", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--target-steps", type=int, default=800)
    parser.add_argument("--draft-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--generations", type=int, default=12288, help="target continuations to distil on")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="per training phase")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for testing the script itself")
    args = parser.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"[train] device {device}, torch {torch.__version__}, stdlib {args.stdlib}")

    train_files, heldout_files = split_corpus(args.stdlib, args.heldout_percent)
    (args.out / "heldout_files.txt").write_text("".join(f"{f.as_posix()}\n" for f in heldout_files))
    train_texts = [read_text(args.stdlib, f) for f in train_files]
    heldout_texts = [read_text(args.stdlib, f) for f in heldout_files]
    print(f"[train] corpus: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
          f"{len(heldout_files)} held-out files ({sum(map(len, heldout_texts)) / 1e6:.1f} MB)")

    tokenizer_dir = args.out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size, tokenizer_dir)
    streams_file = args.out / "streams.pt"
    if streams_file.exists():
        streams = torch.load(streams_file, weights_only=True)
    else:
        streams = {"train": encode_documents(tokenizer, train_texts), "heldout": encode_documents(tokenizer, heldout_texts)}
        torch.save(streams, streams_file)
    train_stream, heldout_stream = streams["train"], streams["heldout"]
    print(f"[train] tokens: {train_stream.numel():,} train, {heldout_stream.numel():,} held-out "
          f"({sum(map(len, train_texts)) / train_stream.numel():.2f} characters per token)")

    from transformers import LlamaForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab_size = len(tokenizer)
    target_shape, draft_shape = TARGET, DRAFT
    if args.tiny:
        target_shape, draft_shape = Shape(64, 2, 4, 2, 128), Shape(32, 1, 2, 1, 64)
    target = LlamaForCausalLM(llama_config(target_shape, vocab_size, args.context, eos_id)).to(device)
    draft = LlamaForCausalLM(llama_config(draft_shape, vocab_size, args.context, eos_id)).to(device)

    def next_token_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = target(batch[:, :-1]).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    target_phase = Phase("target", args.target_steps, args.batch, args.seq_len, 1.5e-3, 200,
                         max(50, args.target_steps // 12), args.max_minutes)
    target_best = run_phase(target_phase, target, next_token_loss, train_stream, heldout_stream, device,
                            args.out / "target", args.seed)
    target.requires_grad_(False).eval()

    generations_file = args.out / "generations.pt"
    if generations_file.exists():
        generated = torch.load(generations_file, weights_only=True)
    else:
        generated = target_generations(target, train_stream, args.generations, 64, 192, device, args.seed)
        torch.save(generated, generations_file)
    # Distillation data: corpus text and target-written text, interleaved by halves of each batch.
    distill_stream = torch.cat([train_stream, generated])
    print(f"[train] distillation stream: {train_stream.numel():,} corpus + {generated.numel():,} generated tokens")

    def distillation_loss(batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(target(inputs).logits.float(), dim=-1)
        student = F.log_softmax(draft(inputs).logits.float(), dim=-1)
        # forward KL(target || draft), per token
        return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")

    draft_phase = Phase("draft", args.draft_steps, args.batch, args.seq_len, 3e-3, 200,
                        max(50, args.draft_steps // 12), args.max_minutes)
    run_phase(draft_phase, draft, distillation_loss, distill_stream, heldout_stream, device, args.out / "draft",
              args.seed + 1)
    draft_heldout = heldout_loss(draft, heldout_stream, args.seq_len, device)
    target_heldout = heldout_loss(target, heldout_stream, args.seq_len, device)
    print(f"[train] final held-out loss (nats/token): target {target_heldout:.4f}, draft {draft_heldout:.4f}")
    agreement = greedy_agreement(target, draft, heldout_stream, device)
    print(f"[train] greedy draft/target agreement on held-out prompts (quick check): {agreement:.1%}")

    if args.export:
        common = {"corpus": "Python standard library (see heldout_files.txt)", "seed": args.seed,
                  "device": str(device), "torch": torch.__version__, "train_files": len(train_files),
                  "heldout_files": len(heldout_files), "train_tokens": train_stream.numel()}
        for name, model, shape, loss, steps in (("target", target, target_shape, target_heldout, args.target_steps),
                                                 ("draft", draft, draft_shape, draft_heldout, args.draft_steps)):
            meta = {**common, "role": name, "shape": asdict(shape), "steps": steps, "heldout_loss": round(loss, 4),
                    "params": sum(p.numel() for p in model.parameters())}
            if name == "draft":
                meta["distilled_from"] = "target (forward KL on corpus and target generations)"
            save_checkpoint(model, tokenizer, args.export / name, meta)
            (args.export / name / "heldout_files.txt").write_text((args.out / "heldout_files.txt").read_text())
        print(f"[train] exported draft/ and target/ to {args.export}")
    print(f"[train] done: target best held-out {target_best:.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
