"""The bundled pair is two ordinary Hugging Face checkpoints that transformers and our runner agree on."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.bundled import DRAFT_DIR, HELDOUT_PROMPTS, TARGET_DIR
from workers.model import ModelRunner
from workers.model.checkpoint import load_tokenizer, tokenizer_fingerprint

CODE = 'class Stack:\n    """LIFO."""\n\n    def push(self, item):\n\tself._items.append(item)  # tab\n\n\n# üñí © 0x1F\n'


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    tokenizer = load_tokenizer(TARGET_DIR)
    text = json.loads(HELDOUT_PROMPTS.read_text().splitlines()[0])
    return tokenizer(text, add_special_tokens=False)["input_ids"][:96]


@pytest.mark.parametrize("directory", [DRAFT_DIR, TARGET_DIR], ids=["draft", "target"])
def test_transformers_and_runner_agree(directory, prompt_ids):
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    runner = ModelRunner.from_checkpoint(directory)
    ids = torch.tensor(prompt_ids)
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
    got = runner.forward(ids, 0)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_pair_shares_a_vocabulary():
    draft, target = ModelRunner.from_checkpoint(DRAFT_DIR), ModelRunner.from_checkpoint(TARGET_DIR)
    assert draft.config.vocab_size == target.config.vocab_size
    assert tokenizer_fingerprint(DRAFT_DIR) == tokenizer_fingerprint(TARGET_DIR)
    # the draft is the small one: at most a sixth of the target's weights
    assert draft.config.num_params * 6 <= target.config.num_params


def test_pair_fits_the_size_budget():
    total = sum(f.stat().st_size for d in (DRAFT_DIR, TARGET_DIR) for f in d.iterdir())
    assert total <= 60 * 1024 * 1024


@pytest.mark.parametrize("text", [CODE, "", " ", "\n\n    \n", "x" * 300])
def test_tokenizer_round_trips_code(text):
    tokenizer = load_tokenizer(TARGET_DIR)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_heldout_prompts():
    tokenizer = load_tokenizer(TARGET_DIR)
    for line in HELDOUT_PROMPTS.read_text().splitlines():
        text = json.loads(line)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text)  # BPE merges: fewer tokens than characters
