"""The bundled draft/target pair, trained by scripts/train_pair.py (see README)."""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
DRAFT_DIR = MODELS_DIR / "draft"
TARGET_DIR = MODELS_DIR / "target"
HELDOUT_PROMPTS = MODELS_DIR / "heldout_prompts.jsonl"
