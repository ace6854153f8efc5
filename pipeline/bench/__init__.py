"""`specpipe bench`: our three modes and two transformers peers on the same prompts, models and machine.

config.py   what to run (the concerns it shares with launch, and its own options' fields)
records.py  what one round (c prompts at once) left behind: per sequence tokens, commit times, acceptance;
            per round the wall, time split, round trips and the goodput controller's summary
ours.py     target-only / serial / overlap (fixed k and goodput) through one running pipeline
peers.py    transformers `generate`, target alone and with `assistant_model=` (assisted generation)
figures.py  per-configuration, per-concurrency figures: rates, latency percentiles, acceptance, time split
theory.py   the speedup that measured acceptance and measured step costs predict
report.py   the table, the JSON file, the Markdown report and its plots
run.py      all of the above at every --concurrency, interleaved round by round
command.py  the command: checks, the run, the table and the files
"""
