"""Settings declared once: a field of a service's config dataclass is also its flag, its
environment variable and its help.

    @program("epoxi router", "Route emails to node pipelines.", env_prefix="EPOXI_ROUTER_")
    @dataclass
    class RouterConfig:
        listen: str = setting("127.0.0.1:50051", help="host:port to serve gRPC on")
        check_interval: float = setting(5.0, parse=durations.seconds, shown="5s", help="...")

    config = settings.parse(RouterConfig, argv)

A field ``check_interval`` is ``--check-interval`` and ``EPOXI_ROUTER_CHECK_INTERVAL``; a flag
beats the environment, which beats the default. A repeated setting takes its flag once per
value, or its environment variable as a comma-separated list. A field that holds another config
dataclass (``group()``) adds that one's settings too; fields declared with plain ``field()``
are for in-process use only and have no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_KEY = "epoxi.setting"
_GROUP = "epoxi.settings-group"
_PROGRAM = "__epoxi_program__"


@dataclasses.dataclass(frozen=True)
class Program:
    prog: str
    description: str
    # Environment variables are this prefix and the field's name; None: no environment.
    env_prefix: str | None


def program(prog: str, description: str, *, env_prefix: str | None = None) -> Callable[[type[T]], type[T]]:
    """Declare the command a config class is the settings of: its name, what it does, and
    the prefix of its environment variables."""

    def declare(cls: type[T]) -> type[T]:
        setattr(cls, _PROGRAM, Program(prog, description, env_prefix))
        return cls

    return declare


def _program(cls: type) -> Program:
    found = getattr(cls, _PROGRAM, None)
    return found if isinstance(found, Program) else Program(cls.__name__, "", None)


@dataclasses.dataclass(frozen=True)
class Setting:
    help: str
    parse: Callable[[str], Any]
    flag: str | None
    env: tuple[str, ...] | None
    repeated: bool
    collect: Callable[[tuple[Any, ...]], Any]
    required: bool
    shown: str | None
    metavar: str | None
    cli: bool


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    parse: Callable[[str], Any] = str,
    flag: str | None = None,
    env: str | Sequence[str] | None = None,
    repeated: bool = False,
    collect: Callable[[tuple[Any, ...]], Any] = tuple,
    required: bool = False,
    shown: str | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a setting.

    ``parse`` turns one text value into the field's value and raises ValueError (or
    ``argparse.ArgumentTypeError``) with a message when it cannot. ``env`` names the variables
    read in order (default: the prefix and the field's name); ``shown`` is the default as
    help writes it; a ``repeated`` setting's values are passed to ``collect`` (a tuple by
    default; ``dict`` for ``parse`` functions that return pairs); ``required`` ones must not end empty.
    A setting with ``cli=False`` has no flag, only its environment variables: for secrets, which
    a flag would show in ``ps``.
    """
    meta = {
        _KEY: Setting(
            help=help,
            parse=parse,
            flag=flag,
            env=(env,) if isinstance(env, str) else (tuple(env) if env is not None else None),
            repeated=repeated,
            collect=collect,
            required=required,
            shown=shown,
            metavar=metavar,
            cli=cli,
        )
    }
    if repeated and default is dataclasses.MISSING and default_factory is None:
        default_factory = lambda: collect(())  # noqa: E731
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(factory: Callable[[], Any]) -> Any:
    """A field holding another config dataclass whose settings are this one's too."""
    return dataclasses.field(default_factory=factory, metadata={_GROUP: True})


@dataclasses.dataclass(frozen=True)
class _Declared:
    path: tuple[str, ...]  # field names from the top config down
    field: dataclasses.Field[Any]
    setting: Setting

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.path[-1].replace("_", "-")

    def envs(self, prefix: str | None) -> tuple[str, ...]:
        if self.setting.env is not None:
            return self.setting.env
        return (prefix + self.path[-1].upper(),) if prefix is not None else ()


def _declared(cls: type, path: tuple[str, ...] = ()) -> list[_Declared]:
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get(_GROUP):
            out += _declared(_group_class(f), (*path, f.name))
        elif (s := f.metadata.get(_KEY)) is not None:
            out.append(_Declared((*path, f.name), f, s))
    return out


def _group_class(f: dataclasses.Field[Any]) -> type:
    factory = f.default_factory
    assert callable(factory), f"group {f.name} has no factory"
    return type(factory())


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _text_type(d: _Declared) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return d.setting.parse(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"{text!r} is not valid") from None

    convert.__name__ = d.setting.metavar or d.path[-1]
    return convert


def add_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str | None = None) -> None:
    """Add a flag for every setting of ``cls`` (and of its groups) to ``parser``; the environment
    prefix defaults to the one ``cls``'s ``program`` declares."""
    env_prefix = env_prefix if env_prefix is not None else _program(cls).env_prefix
    env_only = []
    for d in _declared(cls):
        if not d.setting.cli:
            env_only.append(f"  {' or '.join(d.envs(env_prefix))}: {d.setting.help}")
            continue
        default = _default(d.field)
        shown = d.setting.shown
        if (
            shown is None
            and default is not dataclasses.MISSING
            and default not in (None, "")
            and not (d.setting.repeated and not default)
        ):
            shown = ", ".join(map(str, default)) if d.setting.repeated else str(default)
        extra = []
        if d.setting.repeated:
            extra.append("repeatable")
        if shown is not None:
            extra.append(f"default {shown}")
        envs = d.envs(env_prefix)
        if envs:
            extra.append("env " + " or ".join(envs) + (" (comma-separated)" if d.setting.repeated else ""))
        parser.add_argument(
            d.flag,
            dest=d.dest,
            type=_text_type(d),
            action="append" if d.setting.repeated else "store",
            default=None,
            metavar=d.setting.metavar or d.flag.lstrip("-").replace("-", "_").upper(),
            help=d.setting.help + (f" ({'; '.join(extra)})" if extra else ""),
        )
    if env_only:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "\n".join([*filter(None, [parser.epilog]), "environment only:", *env_only])


def from_args(
    cls: type[T],
    args: argparse.Namespace,
    env_prefix: str | None = None,
    parser: argparse.ArgumentParser | None = None,
    environ: os._Environ[str] | dict[str, str] | None = None,
) -> T:
    """The config for ``args`` (parsed with ``add_arguments``): flag, else environment, else default.

    A bad environment value or a missing required setting is reported through ``parser.error``
    when a parser is given, else raised as ValueError."""
    env = os.environ if environ is None else environ
    env_prefix = env_prefix if env_prefix is not None else _program(cls).env_prefix
    values: dict[tuple[str, ...], Any] = {}
    for d in _declared(cls):
        value = getattr(args, d.dest, None)
        if value is not None and d.setting.repeated:
            value = d.setting.collect(tuple(value))
        if value is None:
            value = _from_env(d, env, env_prefix, parser)
        if value is None:
            default = _default(d.field)
            if default is dataclasses.MISSING:
                _fail(parser, f"{d.flag} is required")
            value = default
        if d.setting.required and not value:
            names = " or ".join((d.flag, *d.envs(env_prefix)))
            _fail(parser, f"give at least one {names}" if d.setting.repeated else f"give {names}")
        values[d.path] = value
    return _build(cls, (), values)


def _from_env(
    d: _Declared,
    env: os._Environ[str] | dict[str, str],
    prefix: str | None,
    parser: argparse.ArgumentParser | None,
) -> Any:
    for name in d.envs(prefix):
        text = env.get(name)
        if not text:
            continue
        try:
            if d.setting.repeated:
                return d.setting.collect(tuple(d.setting.parse(part) for part in text.split(",") if part))
            return d.setting.parse(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            _fail(parser, f"{name}={text!r}: {e}")
    return None


def _build(cls: type[T], path: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        here = (*path, f.name)
        if f.metadata.get(_GROUP):
            kwargs[f.name] = _build(_group_class(f), here, values)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)


def _fail(parser: argparse.ArgumentParser | None, message: str) -> Any:
    if parser is not None:
        parser.error(message)
    raise ValueError(message)


def parse(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and the environment into a ``cls``, as the
    command its ``program`` declares."""
    declared = _program(cls)
    parser = argparse.ArgumentParser(prog=declared.prog, description=declared.description)
    add_arguments(parser, cls)
    return from_args(cls, parser.parse_args(argv), parser=parser)
