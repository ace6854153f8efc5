"""`specpipe distill`: corpus -> target continuations -> distillation -> checkpoint -> evaluation."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from pipeline.distill.config import DistillConfig
from pipeline.distill.corpus import Corpus, read_corpus, token_stream
from pipeline.distill.evaluate import PairReport, evaluate_pair
from pipeline.distill.hf_models import end_of_text_id, load_target, new_draft, save_draft, shape_of
from pipeline.distill.train import Streams, distill, target_continuations
from pipeline.prompts import select_prompts
from workers.bundled import HELDOUT_PROMPTS

RECIPE = "forward KL(target || draft) on corpus windows and on continuations the target wrote (half greedy)"


def log(text: str) -> None:
    print(f"[distill] {text}", file=sys.stderr, flush=True)


def run_distill(config: DistillConfig) -> int:
    config.validate()
    texts = select_prompts(config.evaluation.prompts, bundled=HELDOUT_PROMPTS).measured
    if config.eval_only:
        report = evaluate(config, config.models.draft_dir, texts)
        write_report(config, report)
        return 0
    out_dir = config.out_dir
    assert out_dir is not None  # validate() saw to it
    state_dir = out_dir / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target_dir = config.models.target_dir
    log(f"target {target_dir} on {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, device, torch.float32)
    eos_id = end_of_text_id(target.config)
    if eos_id is None:
        raise ValueError(f"the target {target_dir} names no eos_token_id in config.json; documents need a separator")
    corpus = read_corpus(config.corpus)
    corpus_stream, validation_stream = cached_streams(state_dir, corpus, tokenizer, eos_id)
    log(f"corpus: {len(corpus.train)} files, {corpus_stream.numel():,} tokens ({corpus.duplicates} duplicates "
        f"dropped), {validation_stream.numel():,} tokens held back for validation")

    generated = cached_generations(state_dir, target, corpus_stream, config, device)
    draft = new_draft(target.config, config.shape, config.init_dir, config.training.seed).to(device)
    shape = shape_of(draft)
    log(f"draft: {shape.layers} layers x {shape.width} wide ({sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M "
        f"params){f', from {config.init_dir}' if config.init_dir else ''}; target "
        f"{sum(p.numel() for p in target.parameters()) / 1e6:.2f}M params")
    began = time.perf_counter()
    progress = distill(draft, target, Streams(corpus_stream, generated, validation_stream), config.training, device,
                       state_dir, log)
    log(f"trained {progress.step} steps on {progress.tokens:,} tokens in {progress.seconds / 60:.1f} min "
        f"(this run {(time.perf_counter() - began) / 60:.1f} min); validation KL {progress.validation_kl:.4f}")
    card = {
        "role": "draft", "distilled_from": str(target_dir), "recipe": RECIPE, "corpus": list(corpus.sources),
        "corpus_files": len(corpus.train), "corpus_tokens": corpus_stream.numel(),
        "target_continuations": config.training.generations, "init": str(config.init_dir) if config.init_dir else None,
        "shape": {"layers": shape.layers, "width": shape.width, "heads": shape.heads, "kv_heads": shape.kv_heads,
                  "ffn": shape.ffn},
        "params": sum(p.numel() for p in draft.parameters()), "steps": progress.step, "tokens_seen": progress.tokens,
        "minutes": round(progress.seconds / 60, 2), "batch_size": config.training.batch_size,
        "seq_len": config.training.seq_len, "learning_rate": config.training.learning_rate,
        "validation_kl": round(progress.validation_kl or 0.0, 4), "device": str(device), "torch": torch.__version__,
        "seed": config.training.seed,
    }
    save_draft(draft, target_dir, out_dir, card)
    log(f"wrote {out_dir} (a transformers checkpoint: `specpipe launch --draft {out_dir}`)")
    report = evaluate(config, out_dir, texts)
    card["evaluation"] = report.to_json()
    (out_dir / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    write_report(config, report)
    return 0


def cached_streams(state_dir: Path, corpus: Corpus, tokenizer, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as token streams, tokenized once per corpus and kept under --out for a resumed run."""
    digest = hashlib.sha256("\0".join(corpus.train + ["\1"] + corpus.validation).encode()).hexdigest()[:16]
    path = state_dir / f"streams-{digest}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["corpus"], saved["validation"]
    streams = token_stream(tokenizer, corpus.train, eos_id), token_stream(tokenizer, corpus.validation, eos_id)
    torch.save({"corpus": streams[0], "validation": streams[1]}, path)
    return streams


def cached_generations(state_dir: Path, target, corpus_stream: torch.Tensor, config: DistillConfig,
                       device: torch.device) -> torch.Tensor:
    count = config.training.generations
    path = state_dir / f"continuations-{count}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    began = time.perf_counter()
    generated = target_continuations(target, corpus_stream, count, device, config.training.seed)
    torch.save(generated, path)
    if count:
        log(f"the target wrote {count} continuations ({generated.numel():,} tokens) in "
            f"{time.perf_counter() - began:.0f} s")
    return generated


def evaluate(config: DistillConfig, draft_dir: Path, texts: list[str]) -> PairReport:
    log(f"evaluating {draft_dir} on {len(texts)} prompts, {config.evaluation.max_new_tokens} target tokens each")
    return evaluate_pair(draft_dir, config.models.target_dir, texts, config.evaluation.max_new_tokens,
                        config.evaluation.windows)


def write_report(config: DistillConfig, report: PairReport) -> None:
    for line in report.lines():
        print(line)
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"figures: {config.json_out}")
