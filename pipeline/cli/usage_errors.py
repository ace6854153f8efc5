"""How the command line reports errors: bad input is one line on stderr and exit status 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from pipeline.errors import WorkerFailed
from workers.errors import SpecpipeError


class UserError(click.ClickException):
    """One clear line on stderr and exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"specpipe: error: {self.message}", err=True)


class OneLineErrorsCommand(click.Command):
    """A command whose usage errors (a bad value, an unknown option) are one line, as UserError's are."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise UserError(error.format_message()) from None


class OneLineErrorsGroup(click.Group):
    command_class = OneLineErrorsCommand


@contextmanager
def reported_errors() -> Iterator[None]:
    """Bad input (a value the checks refuse, a worker that will not serve it) as a UserError; a worker that
    failed while running as one line and exit status 1."""
    try:
        yield
    except (SpecpipeError, ValueError, TimeoutError) as error:
        raise UserError(str(error)) from None
    except (WorkerFailed, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
