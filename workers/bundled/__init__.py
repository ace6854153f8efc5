"""The bundled draft/target pair, trained by scripts/train_pair.py (model card: docs/models.md)."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
DRAFT_DIR = BUNDLED_DIR / "draft"
TARGET_DIR = BUNDLED_DIR / "target"
HELDOUT_PROMPTS = BUNDLED_DIR / "heldout_prompts.jsonl"
