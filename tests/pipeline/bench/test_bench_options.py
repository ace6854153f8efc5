"""`specpipe bench --concurrency 1,4,16`: parsed into a tuple, checked before anything starts."""

from click.testing import CliRunner

import pipeline.bench.command
from pipeline.bench.config import BenchConfig
from pipeline.cli.main import main
from pipeline.cli.parameters import config_from


def bench_config(args: list[str]) -> BenchConfig:
    return config_from(BenchConfig, main.commands["bench"].make_context("bench", args).params)


def test_concurrency_takes_a_comma_separated_list():
    assert bench_config(["--concurrency", "1,4,16"]).concurrency == (1, 4, 16)
    assert bench_config(["--concurrency", "8"]).concurrency == (8,)
    assert bench_config([]).concurrency == (1,)


def test_a_concurrency_below_1_is_refused_naming_the_option(monkeypatch):
    ran = []
    monkeypatch.setattr(pipeline.bench.command, "run_bench", lambda *args: ran.append(args))
    result = CliRunner().invoke(main, ["bench", "--concurrency", "1,0,4", "--peers", "none"])
    assert result.exit_code == 2 and not ran
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("specpipe: error: --concurrency") and "1,0,4" in line


def test_launch_still_takes_one_concurrency():
    params = main.commands["launch"].make_context("launch", ["--concurrency", "3"]).params
    assert params["concurrency"] == 3
    result = CliRunner().invoke(main, ["launch", "--concurrency", "2,4"])
    assert result.exit_code == 2 and "specpipe bench" in result.stderr
