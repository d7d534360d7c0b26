"""Settings declared once: the field is the flag, the environment variable and the help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from epoxi import durations, settings
from epoxi.settings import group, program, setting


def pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key, value


@dataclass(frozen=True)
class Inner:
    dns: str | None = setting(None, help="DNS server")
    host_backoff: float = setting(60.0, parse=durations.seconds, shown="60s", help="host backoff")


@program("x", "does x", env_prefix="X_")
@dataclass(frozen=True)
class Config:
    id: str = setting(help="the ID")
    egress_ips: tuple[str, ...] = setting(flag="--egress-ip", env="X_EGRESS_IP", repeated=True, help="IPs")
    routes: dict[str, str] = setting(flag="--route", parse=pair, repeated=True, collect=dict, help="routes")
    check_interval: float = setting(5.0, parse=durations.seconds, shown="5s", help="interval")
    consul: str | None = setting(None, env=("X_CONSUL", "CONSUL_HTTP_ADDR"), help="registry")
    inner: Inner = group(Inner)
    in_process_only: int = field(default=3)


def parse(argv: list[str], env: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, Config)  # the prefix comes from @program
    return settings.from_args(Config, parser.parse_args(argv), environ=env or {})


def test_a_flag_beats_the_environment_which_beats_the_default() -> None:
    c = parse(["--id", "n1"])
    assert (c.check_interval, c.consul, c.egress_ips, c.routes, c.inner) == (5.0, None, (), {}, Inner())
    env = {"X_CHECK_INTERVAL": "2m", "CONSUL_HTTP_ADDR": "h:8500", "X_HOST_BACKOFF": "1s", "X_ID": "env"}
    c = parse([], env)
    assert (c.id, c.check_interval, c.consul, c.inner.host_backoff) == ("env", 120.0, "h:8500", 1.0)
    c = parse(["--check-interval", "500ms", "--consul", "flag:1"], {**env, "X_CONSUL": "first:2"})
    assert (c.check_interval, c.consul) == (0.5, "flag:1")
    assert parse([], {**env, "X_CONSUL": "first:2"}).consul == "first:2"  # the first variable named wins


def test_repeated_settings_take_a_flag_per_value_or_a_comma_separated_variable() -> None:
    c = parse(["--id=n", "--egress-ip", "a", "--egress-ip", "b", "--route", "x=1", "--route", "y=2"])
    assert (c.egress_ips, c.routes) == (("a", "b"), {"x": "1", "y": "2"})
    c = parse(["--id=n"], {"X_EGRESS_IP": "a,b", "X_ROUTES": "x=1"})
    assert (c.egress_ips, c.routes) == (("a", "b"), {"x": "1"})


def test_fields_without_a_setting_have_no_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--id", "n", "--in-process-only", "4"])
    assert "unrecognized arguments: --in-process-only" in capsys.readouterr().err


def test_bad_values_are_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--id", "n", "--check-interval", "soon"])
    assert "is not a duration like 500ms" in capsys.readouterr().err
    with pytest.raises(ValueError, match="X_CHECK_INTERVAL='soon'"):
        parse(["--id", "n"], {"X_CHECK_INTERVAL": "soon"})
    with pytest.raises(ValueError, match="--id is required"):
        parse([])


def test_help_says_the_default_and_the_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        settings.parse(Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: x ") and "does x" in text
    assert "interval (default 5s; env X_CHECK_INTERVAL)" in text
    assert "registry (env X_CONSUL or CONSUL_HTTP_ADDR)" in text
    assert "IPs (repeatable; env X_EGRESS_IP (comma-separated))" in text
    assert "host backoff (default 60s; env X_HOST_BACKOFF)" in text


def test_in_process_construction_needs_no_flags() -> None:
    assert Config(id="n").inner.host_backoff == 60.0 and Config(id="n").routes == {}
