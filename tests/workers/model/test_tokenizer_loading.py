"""A checkpoint's tokenizer loads as transformers' AutoTokenizer loads it, whichever way it is taken."""

import json
import shutil

from transformers import AutoTokenizer

from workers.bundled import HELDOUT_PROMPTS, TARGET_DIR
from workers.model.checkpoint import load_tokenizer


def test_a_plain_tokenizer_json_loads_as_autotokenizer_would(tmp_path):
    texts = [json.loads(line) for line in HELDOUT_PROMPTS.read_text().splitlines()[:10]]
    reference = AutoTokenizer.from_pretrained(str(TARGET_DIR), local_files_only=True)
    fast = load_tokenizer(TARGET_DIR)  # its tokenizer_config names TokenizersBackend: taken without AutoConfig
    assert type(fast) is type(reference)
    assert [fast(text)["input_ids"] for text in texts] == [reference(text)["input_ids"] for text in texts]
    assert (fast.bos_token, fast.eos_token, fast.pad_token) == (reference.bos_token, reference.eos_token,
                                                                reference.pad_token)
    # a tokenizer_config naming another class goes through AutoTokenizer itself
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(TARGET_DIR / name, tmp_path / name)
    config = json.loads((TARGET_DIR / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                if k != "tokenizer_class"}))
    assert load_tokenizer(tmp_path)(texts[0])["input_ids"] == reference(texts[0])["input_ids"]
