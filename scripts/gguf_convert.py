"""llama.cpp's own convert_hf_to_gguf.py, run unchanged, knowing one tokenizer more.

    python scripts/gguf_convert.py LLAMA_CPP_DIR CHECKPOINT --outtype f16 --outfile OUT.gguf

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a test string, and refuses
hashes it has not been told of. Ours is a byte-level BPE with GPT-2's own rule (tokenizers' ByteLevel
pre-tokenizer, its regex on, no prefix space, no normalizer), which llama.cpp implements as "gpt-2"; a
tokenizer.json that says exactly that is named so. Any other unknown tokenizer is still refused.

The GGUF also records whether the tokenizer adds a BOS, as transformers does for this checkpoint, where
tokenizer_config.json does not say (llama.cpp would otherwise decide by the pre-tokenizer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gpt2_byte_level(tokenizer_json: Path) -> bool:
    spec = json.loads(tokenizer_json.read_text())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("model", {}).get("type") == "BPE" and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


def main() -> None:
    llama_cpp = Path(sys.argv[1]).resolve()
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    import conversion.base as base  # llama.cpp's converter package

    known = base.TextModel.get_vocab_base_pre
    prepare_metadata = base.TextModel.prepare_metadata  # where the tokenizer is written

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if gpt2_byte_level(self.dir_model / "tokenizer.json"):
                return "gpt-2"
            raise

    def prepare_metadata_with_bos(self, vocab_only: bool) -> None:
        prepare_metadata(self, vocab_only)
        config = self.dir_model / "tokenizer_config.json"
        if config.exists() and "add_bos_token" in json.loads(config.read_text()):
            return  # the converter has written what the checkpoint says
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.dir_model)
        bos = tokenizer.bos_token_id
        self.gguf_writer.add_add_bos_token(bos is not None and tokenizer("x")["input_ids"][:1] == [bos])

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    base.TextModel.prepare_metadata = prepare_metadata_with_bos
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
