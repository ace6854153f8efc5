"""One command-line option: its flag, type, default and help, and the config field it fills.

An `Option` is a click decorator; `options(...)` composes several. The click parameter of an option
is named after its field, so that `config_from` can build a command's config object (a tree of frozen
dataclasses, see pipeline.config) from what click parsed: each value goes to the one field of that name.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click

Command = TypeVar("Command", bound=Callable[..., Any])
Config = TypeVar("Config")

SWEEP_HELP = " A comma-separated list runs once per value."


class OneValue(click.ParamType):
    """The value of an option that `specpipe bench` sweeps, where a command takes one: a list is refused."""

    def __init__(self, item: click.ParamType) -> None:
        self.item = item
        self.name = item.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and "," in value:
            self.fail(f"{value!r} is a list, and this command takes one value (a comma-separated list is for "
                      "`specpipe bench`, which runs once per value)", param, ctx)
        return self.item.convert(value, param, ctx)


class Sweep(click.ParamType):
    """Comma-separated values of one option, as a tuple: `specpipe bench` runs once per value."""

    def __init__(self, item: click.ParamType) -> None:
        self.item = item
        self.name = f"{item.name},..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        if not parts:
            self.fail(f"{value!r} holds no value; give one or a comma-separated list, e.g. 2,3,5", param, ctx)
        return tuple(self.item.convert(part, param, ctx) for part in parts)


class ChoiceList(click.ParamType):
    """A comma-separated subset of `choices`, as a tuple in the order given; "none" = the empty tuple."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.name = ",".join(choices) + "|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        if parts == ["none"]:
            return ()
        unknown = [part for part in parts if part not in self.choices]
        if unknown or not parts:
            self.fail(f"{value!r}: give a comma-separated list of {', '.join(self.choices)}, or none", param, ctx)
        return tuple(dict.fromkeys(parts))


class CoreList(click.ParamType):
    """Comma-separated CPU core numbers, as a tuple ("" = none)."""

    name = "cores"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(core) for core in str(value).split(",") if core.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of core numbers", param, ctx)


@dataclass(frozen=True)
class Option:
    """One option, defined once: every command that takes it takes exactly this."""

    flag: str  # "--max-new-tokens", or "--peers/--no-peers" for an on/off pair
    field: str  # the config field it fills (and the name of its click parameter)
    help: str
    type: click.ParamType | None = None  # None: a flag (or an on/off pair)
    default: Any = None
    show_default: bool | str = True
    multiple: bool = False
    metavar: str | None = None
    required: bool = False
    sweepable: bool = False  # `specpipe bench` takes a list of values (see sweep); elsewhere a list is refused

    def __call__(self, command: Command) -> Command:
        value_type = OneValue(self.type) if self.sweepable else self.type
        settings = dict(type=value_type, help=self.help, show_default=self.show_default, multiple=self.multiple,
                        metavar=self.metavar, required=self.required, is_flag=self.type is None)
        if self.default is not None:  # click takes an explicit None for a default, and then nothing is missing
            settings["default"] = self.default
        return click.option(self.flag, self.field, **settings)(command)

    def sweep(self) -> Callable[[Command], Command]:
        """The same option taking a comma-separated list of its values (its field then holds a tuple)."""
        if not self.sweepable:
            raise TypeError(f"{self.flag} is not an option that bench sweeps")
        return click.option(self.flag, self.field, type=Sweep(self.type), default=str(self.default),
                            help=self.help + SWEEP_HELP, show_default=self.show_default, metavar=self.metavar)


def options(*chosen: Callable[[Command], Command]) -> Callable[[Command], Command]:
    """Several options as one decorator, listed by --help in the order given."""

    def decorate(command: Command) -> Command:
        for option in reversed(chosen):
            command = option(command)
        return command

    return decorate


def field_paths(config_type: type) -> dict[str, tuple[str, ...]]:
    """Each leaf field of a (nested) config dataclass -> its path of attribute names. A name occurs once in
    a command's config, so an option's field names one place."""
    paths: dict[str, tuple[str, ...]] = {}
    for name, hint in _field_types(config_type).items():
        inner = field_paths(hint) if dataclasses.is_dataclass(hint) else {name: ()}
        for leaf, path in inner.items():
            if leaf in paths:
                raise TypeError(f"{config_type.__name__} holds two fields named {leaf!r}")
            paths[leaf] = (name, *path)
    return paths


def config_from(config_type: type[Config], values: Mapping[str, Any]) -> Config:
    """The config object that option values (field name -> value, as click passes them) describe; fields
    without a value keep their defaults. Every value must fill a field."""
    unknown = set(values) - set(field_paths(config_type))
    if unknown:
        raise TypeError(f"{config_type.__name__} has no field for {', '.join(sorted(unknown))}")
    return _build(config_type, values)


def _build(config_type: type[Config], values: Mapping[str, Any]) -> Config:
    filled = {}
    for name, hint in _field_types(config_type).items():
        if dataclasses.is_dataclass(hint):
            filled[name] = _build(hint, values)
        elif name in values:
            filled[name] = values[name]
    return config_type(**filled)


def _field_types(config_type: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_type)
    return {field.name: hints[field.name] for field in dataclasses.fields(config_type)}
