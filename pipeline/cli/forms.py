"""The machinery behind the console scripts: a command's errors as one line, a script that ends
its process, and ConfigCommand, whose options are a config dataclass's fields (pipeline/cli/__init__.py
wires the commands with it)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import sys
from collections.abc import Callable
from typing import Annotated

import typer
import typer.core

from pipeline.errors import UserError, as_options, printable
from pipeline.redact import redact


def one_line_errors(fn: Callable) -> Callable:
    """Expected failures become `error: ...` on stderr and exit code 2, never a traceback."""

    # Not __annotations__: a ConfigCommand builds its signature only when typer asks for it.
    @functools.wraps(fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # printable: the message may quote a key or member name from a shard (one line, no escapes)
            # redact: a URL's query string (a pre-signature) or user:password@ is a secret
            typer.echo(f"error: {printable(redact(as_options(str(e))))}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class OneLineUsageErrors(typer.core.TyperCommand):
    """click's own usage errors (unknown option, bad value, missing argument) as one `error: ...` line
    and exit code 2, like every other bad argument, instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click.UsageError, BadParameter, ...
            message = " ".join(e.format_message().split())
            typer.echo(f"error: {redact(message)} (see --help)", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class Script(typer.Typer):
    """A console script: calling it runs the command, and then the process ends."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # Keep what exists now out of the interpreter's last garbage collection, which otherwise
            # walks every object numpy, PyAV, OpenCV and pyarrow made: measured on pack-shards here,
            # 59 ms from the command's end to the process's, 19 ms with the freeze.
            gc.freeze()


def make_app(fn: Callable) -> typer.Typer:
    app = Script(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=fn.__doc__, cls=OneLineUsageErrors)(one_line_errors(fn))
    return app


@dataclasses.dataclass(frozen=True)
class Form:
    """How a config field looks on the command line where its own type does not fit a flag."""

    type: object = None
    """The option's type on the command line (e.g. list[str] for a tuple of patterns); None: the field's."""
    parse: Callable | None = None
    """Command-line value -> field value."""
    names: tuple[str, ...] = ()
    """Option names (e.g. an alias); empty: --field-name."""
    required: bool = False
    shown: Callable | None = None
    """Field default -> the command line's default."""


def field_docs(cls) -> dict[str, str]:
    """The one-line docstrings under a dataclass's fields (the source is their only record)."""
    import ast

    module = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    body = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    docs = {}
    for field, doc in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


def as_help(doc: str, fields: set[str], default_is_none: bool) -> str:
    """A field's docstring as --help text: `field` names become --field-name, other quoted words
    lose their quotes, and "None: ..." (what None means) becomes "[default: ...]"."""
    import re

    text = re.sub(r"`([^`]+)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in fields else m[1], doc)
    if default_is_none:
        text = re.sub(r"(?:^|[;.] )None: (.*?)\.?$", lambda m: f" [default: {m[1]}].", text).strip()
    return text


class ConfigCommand:
    """A command whose options are the fields of config dataclasses, one option a field, with the
    field's docstring as its help: a field added to StreamConfig (or TrainConfig, BenchConfig) is
    an option of every command built on it, with nothing else to edit. `forms` adapts the fields
    whose type is not a flag's; `skip` ("Class.field") leaves fields out.

    The signature is built when typer first reads it, so that a command that does not run this one
    (pack-shards) never imports the configs."""

    def __init__(self, fn: Callable, configs: tuple[str, ...], forms: dict[str, Form] = {}, skip: tuple[str, ...] = ()):  # noqa: B006
        self.fn, self.configs, self.forms, self.skip = fn, configs, forms, skip
        self.__name__, self.__doc__, self.__module__ = fn.__name__, fn.__doc__, fn.__module__

    @functools.cached_property
    def __signature__(self) -> inspect.Signature:
        import importlib
        import typing

        own = [p for p in inspect.signature(self.fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        params = []
        for spec in self.configs:
            module, name = spec.split(":")
            cls = getattr(importlib.import_module(module), name)
            docs, hints = field_docs(cls), typing.get_type_hints(cls)
            fields = {f.name for f in dataclasses.fields(cls)}
            for f in dataclasses.fields(cls):
                if dataclasses.is_dataclass(hints[f.name]) or f"{name}.{f.name}" in self.skip:
                    continue  # a nested config (`stream`) is made of its own fields' options
                form = self.forms.get(f.name, Form())
                default = f.default if f.default is not dataclasses.MISSING else None
                kind = form.type or hints[f.name]
                names = form.names
                if kind is bool and not names:
                    flag = "--" + f.name.replace("_", "-")
                    names = (f"{flag}/--no-{flag[2:]}",) if default else (flag,)
                shown = form.shown(default) if form.shown else default
                option = typer.Option(
                    *names, help=as_help(docs[f.name], fields, default is None), show_default=shown is not None
                )
                params.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        annotation=Annotated[kind, option],
                        default=inspect.Parameter.empty if form.required else shown,
                    )
                )
        return inspect.Signature(own + params)

    @property
    def __annotations__(self) -> dict:
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **values):
        for name, form in self.forms.items():
            if form.parse and name in values:
                values[name] = form.parse(values[name])
        return self.fn(**values)


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (or its environment variable), not defaulted."""
    from typer._click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def fields_of(cls, options: dict, but: tuple[str, ...] = ()) -> dict:
    """The options that are fields of `cls` (less `but`, a field of the same name in another config)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(but)
    return {k: v for k, v in options.items() if k in names}
