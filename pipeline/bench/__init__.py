"""`specpipe bench`: our three modes and two transformers peers on the same prompts, models and machine.

config.py   what to run (the concerns it shares with launch, and its own options' fields)
records.py  what one generation left behind (tokens, commit times, acceptance, time split)
ours.py     target-only / serial / overlap through one running pipeline, interleaved prompt by prompt
peers.py    transformers `generate`, target alone and with `assistant_model=` (assisted generation)
figures.py  per-configuration figures: rates, latency percentiles, acceptance, time split
theory.py   the speedup that measured acceptance and measured step costs predict
report.py   the table, the JSON file, the Markdown report and its plots
run.py      all of the above, in order
command.py  the command: checks, the run, the table and the files
"""
