"""Every option is defined once: the same name, type, default and help in each command that takes it, and
each fills exactly one field of its command's config object."""

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import pipeline.cli.launch
from pipeline.bench.config import BenchConfig
from pipeline.cli.launch import LaunchConfig
from pipeline.cli.main import main
from pipeline.cli.parameters import SWEEP_HELP, ChoiceList, CoreList, Sweep, config_from, field_paths
from pipeline.cli.profile import ProfileConfig
from pipeline.config import ModelsConfig, PromptsConfig, WorkersConfig
from pipeline.distill.config import DistillConfig
from pipeline.prompts import select_prompts
from pipeline.runtime.cluster import cluster_config
from pipeline.serving.config import BenchServeConfig, ServeConfig
from workers.backends.cpu_fp16 import FP16_WEIGHTS
from workers.bundled import HELDOUT_PROMPTS
from workers.worker_settings import DTYPE_CHOICES, WorkerSettings, resolved_dtype

CONFIGS = {"launch": LaunchConfig, "bench": BenchConfig, "profile": ProfileConfig, "worker": WorkerSettings,
           "serve": ServeConfig, "bench-serve": BenchServeConfig, "distill": DistillConfig}
REQUIRED = {"worker": ["--role", "draft", "--checkpoint", "ckpt", "--bind", "ipc:///tmp/w.sock"]}
COMMANDS = {name: main.commands[name] for name in CONFIGS}


def parse(command: str, args: list[str]) -> dict:
    """What click makes of `specpipe COMMAND ARGS`: field name -> value."""
    return COMMANDS[command].make_context(command, [*REQUIRED.get(command, []), *args]).params


def config_of(command: str, args: list[str]):
    return config_from(CONFIGS[command], parse(command, args))


def leaf(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def item_type(param: click.Option) -> click.ParamType:
    """The type of one value (a swept option's list holds values of it)."""
    return getattr(param.type, "item", param.type)


def default_values(param: click.Option) -> tuple:
    return param.type.convert(param.default, param, None) if isinstance(param.type, Sweep) else (param.default,)


def described(param: click.Option) -> tuple:
    kind = item_type(param)
    return (param.opts, param.secondary_opts, type(kind), getattr(kind, "choices", None), default_values(param),
            param.help.removesuffix(SWEEP_HELP), param.multiple, param.is_flag, param.required)


def options_of(command: str) -> dict[str, click.Option]:
    return {param.name: param for param in COMMANDS[command].params if isinstance(param, click.Option)}


def test_an_option_that_several_commands_take_is_the_same_in_each():
    commands_by_option: dict[str, list[str]] = {}
    for command in COMMANDS:
        for name in options_of(command):
            commands_by_option.setdefault(name, []).append(command)
    shared = {name: commands for name, commands in commands_by_option.items() if len(commands) > 1}
    assert {"k", "max_new_tokens", "dtype", "threads", "count", "warmup", "curve_secret_key", "backend"} <= set(shared)
    for name, commands in shared.items():
        first, *others = (described(options_of(command)[name]) for command in commands)
        assert all(other == first for other in others), (name, commands)


@pytest.mark.parametrize("command, field, default", [
    (command, field, default) for command in ("launch", "bench", "profile", "worker")
    for field, default in (("k", 3), ("max_new_tokens", 128), ("max_branches", 12), ("count", 8), ("warmup", 1),
                           ("dtype", "auto"), ("threads", 1), ("mode", "overlap"))
    if field in options_of(command)
])
def test_harmonised_defaults(command, field, default):
    assert default_values(options_of(command)[field]) in ((default,), ((default,),))


@pytest.mark.parametrize("command", CONFIGS)
def test_the_option_defaults_are_the_config_defaults(command):
    config = config_of(command, [])
    if command == "worker":
        assert config == WorkerSettings("draft", "ckpt", "ipc:///tmp/w.sock")
    else:
        assert config == CONFIGS[command]()


def existing(kind: click.Path, path: Path) -> Path:
    """A path that exists, as a directory or as a prompts file, whichever `kind` wants."""
    if kind.file_okay:
        path.write_text('"x"\n')
    else:
        path.mkdir(exist_ok=True)
    return path


def other_value(param: click.Option, tmp_path: Path) -> list[str]:
    """Arguments that give `param` a value other than its default."""
    flag, kind = param.opts[0], item_type(param)
    if param.is_flag:
        return [param.secondary_opts[0] if param.default else flag]
    if param.multiple:
        if isinstance(kind, click.Path):  # --corpus: directories that exist
            return [arg for name in ("first", "second") for arg in (flag, str(existing(kind, tmp_path / name)))]
        return [flag, "first", flag, "second"]
    if isinstance(param.type, Sweep):
        return [flag, "2,5"]
    if isinstance(kind, click.Choice):
        return [flag, next(choice for choice in kind.choices if choice not in (param.default, "draft"))]
    if isinstance(kind, CoreList):
        return [flag, "0,1"]
    if isinstance(kind, ChoiceList):
        return [flag, kind.choices[0]]
    if isinstance(kind, click.Path):
        return [flag, str(existing(kind, tmp_path / param.name) if kind.exists else tmp_path / param.name)]
    number = param.default if isinstance(param.default, (int, float)) else 0  # no default: None
    if kind == click.INT:
        return [flag, str(number + 2)]
    if kind == click.FLOAT:
        return [flag, str(number + 0.25)]
    return [flag, "elsewhere"]


@pytest.mark.parametrize("command, option", [(command, name) for command in CONFIGS for name in options_of(command)])
def test_each_option_fills_its_one_field(command, option, tmp_path):
    param = options_of(command)[option]
    paths = field_paths(CONFIGS[command])
    default, changed = config_of(command, []), config_of(command, other_value(param, tmp_path))
    differing = [path for path in paths.values() if leaf(default, path) != leaf(changed, path)]
    assert differing == [paths[option]], differing


def test_launch_receives_one_config_object_carrying_the_options(monkeypatch, tmp_path):
    received = []
    monkeypatch.setattr(pipeline.cli.launch, "run_launch", lambda config: received.append(config) or 0)
    args = ["--prompt", "a", "--prompt", "b", "--k", "5", "--mode", "serial", "--max-new-tokens", "7", "--top-p", "0.9",
            "--concurrency", "2", "--threads", "2", "--dtype", "float32", "--heartbeat-timeout", "3",
            "--target-addr", "tcp://127.0.0.1:5555", "--json"]
    result = CliRunner().invoke(main, ["launch", *args])
    assert result.exit_code == 0, result.output
    (config,) = received
    assert config.prompts.texts == ("a", "b") and config.concurrency == 2
    assert (config.decode.k, config.decode.mode, config.decode.max_new_tokens) == (5, "serial", 7)
    assert config.decode.sampling.top_p == 0.9
    assert config.workers == WorkersConfig(threads=2, dtype="float32")
    assert config.liveness.heartbeat_timeout_s == 3.0 and config.remote.addresses == {"target": "tcp://127.0.0.1:5555"}
    assert config.output.json_lines is True


def test_bench_sweeps_k_and_max_branches_and_launch_refuses_a_list_in_one_line():
    config = config_of("bench", ["--k", "2,3", "--max-branches", "1,12"])
    assert (config.k, config.max_branches) == ((2, 3), (1, 12))
    assert config_of("bench", ["--k", "4"]).k == (4,)
    for command in ("launch", "profile"):
        result = CliRunner().invoke(main, [command, "--k", "2,3"])
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("specpipe: error: ") and "'--k'" in lines[0], result.stderr
        assert "specpipe bench" in lines[0]


@pytest.mark.parametrize("command, old", [("bench", "--new-tokens"), ("bench", "--json"), ("profile", "--no-warmup")])
def test_old_option_names_are_gone(command, old):
    result = CliRunner().invoke(main, [command, old, "1"] if old != "--no-warmup" else [command, old])
    assert result.exit_code == 2 and f"No such option '{old}'" in result.stderr


def test_profile_takes_a_number_of_warmup_prompts():
    assert config_of("profile", ["--warmup", "0"]).prompts.warmup == 0
    assert config_of("profile", ["--warmup", "2"]).prompts.warmup == 2


def test_a_worker_spec_rebuilds_from_its_argv():
    spec = WorkerSettings("target", "ckpt", "ipc:///tmp/t.sock", backend="ttnn", device="tt:0", dtype="bfloat16",
                      threads=2, cores=(0, 1), io_cores=(2,), slots=3, max_seq_len=64, spin_ms=5.0, nice=4,
                      parent_pid=99, curve_secret_key="k.key_secret", curve_clients=("a.key", "b"))
    assert config_from(WorkerSettings, COMMANDS["worker"].make_context("worker", spec.argv()).params) == spec


def test_auto_dtype_is_resolved_per_device():
    assert resolved_dtype("auto", "cpu") in (FP16_WEIGHTS, "float32")
    assert resolved_dtype("auto", "cuda:0") == "bfloat16"
    assert resolved_dtype("float32", "cuda") == "float32"


def test_config_from_refuses_values_without_a_field_and_fields_named_twice():
    with pytest.raises(TypeError, match="no field for nowhere"):
        config_from(LaunchConfig, {"nowhere": 1})

    @dataclasses.dataclass(frozen=True)
    class Twice:
        models: ModelsConfig = ModelsConfig()
        draft_dir: Path = Path()

    with pytest.raises(TypeError, match="two fields named 'draft_dir'"):
        field_paths(Twice)


def test_prompts_are_the_texts_then_the_file_after_its_warmup_lines(tmp_path):
    lines = [f"p{i}" for i in range(5)]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(f'"{line}"\n' for line in lines))
    both = select_prompts(PromptsConfig(("a",), file, count=2, warmup=1), HELDOUT_PROMPTS)
    assert (both.warmup, both.measured) == (["p0"], ["a", "p1", "p2"])
    texts_only = select_prompts(PromptsConfig(("a",), count=2, warmup=1), file)  # warm-up from the bundled file
    assert (texts_only.warmup, texts_only.measured) == (["p0"], ["a"])
    every_line = select_prompts(PromptsConfig(file=file))  # launch: no count, no warm-up
    assert (every_line.warmup, every_line.measured) == ([], lines)
    with pytest.raises(ValueError, match="holds 5 prompts; --warmup 1 plus --prompts 8 need 9"):
        select_prompts(PromptsConfig(file=file, count=8, warmup=1))


def test_one_place_makes_the_workers_of_a_mode():
    overlap = cluster_config(ModelsConfig(), WorkersConfig(), "overlap", slots=3)
    assert overlap.draft is not None and overlap.draft.slots == overlap.target.slots == 3
    assert overlap.target.dtype == "auto"  # each worker resolves it for its own device
    assert not set(overlap.draft.cores) & set(overlap.target.cores)
    target_only = cluster_config(ModelsConfig(), WorkersConfig(target_device="cuda"), "target-only")
    assert target_only.draft is None and target_only.target.cores == () and target_only.target.device == "cuda"


def test_every_dtype_choice_is_one_a_worker_can_load():
    from workers.backends.torch_device import DTYPES

    assert DTYPE_CHOICES[0] == "auto"
    assert all(name == FP16_WEIGHTS or name in DTYPES for name in DTYPE_CHOICES[1:])
