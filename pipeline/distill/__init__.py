"""`specpipe distill`: a draft for any Llama-family target, distilled on the target's own distributions.

The recipe that made the bundled draft: a small decoder with the target's tokenizer and vocabulary learns
to match the target's next-token distributions (forward KL) over a corpus and over continuations the
target writes itself, the prefixes the draft will see when it drafts. `corpus` reads the text, `models`
shapes and saves the draft, `train` runs the resumable loop, `evaluate` measures the pair the way
speculation uses it, and `command` puts them in order.
"""
