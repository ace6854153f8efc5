"""`specpipe bench` as the command runs it: check what was asked, measure, print the table, write the files."""

from __future__ import annotations

from pipeline.bench.config import BenchConfig
from pipeline.bench.report import describe, text_table, write_json, write_report
from pipeline.bench.run import run_bench
from pipeline.runtime.preflight import check_checkpoints, check_workers


def run_bench_command(config: BenchConfig, command: str) -> None:
    """Raises ValueError (or SpecpipeError) naming the option to change when the input is bad."""
    config.validate()
    check_workers(config.workers)
    check_checkpoints(config.models, uses_draft=True)
    result = run_bench(config, command)
    print(text_table(result))
    for line in describe(result):
        print(line)
    output = config.output
    if output.json_out is not None:
        write_json(result, output.json_out)
        print(f"figures: {output.json_out}")
    if output.report_dir is not None:
        written = write_report(result, output.report_dir)
        print(f"report: {written[0]} (+{len(written) - 1} plots)")
