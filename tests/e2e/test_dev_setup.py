"""`scripts/dev`'s setup step, scripts/bootstrap: silent when all is set up, loud when a step fails."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def run(script: Path, path: str | None = None) -> tuple[int, str]:
    env = {"PATH": path} if path is not None else None
    proc = await asyncio.create_subprocess_exec(
        str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


async def test_bootstrap_prints_nothing_when_all_is_set_up() -> None:
    # Set up already (the suite runs in the project's .venv); a second run has nothing to say.
    code, out = await run(ROOT / "scripts" / "bootstrap")
    assert code == 0, out
    assert "Writing mypy" not in out
    assert out == ""


async def test_a_failing_setup_step_shows_its_output(tmp_path: Path) -> None:
    # A tree where everything is set up but the stubs check fails, printing on stdout and stderr.
    executable(tmp_path / "scripts" / "bootstrap", (ROOT / "scripts" / "bootstrap").read_text())
    (tmp_path / "pyproject.toml").write_text("")
    executable(
        tmp_path / ".venv" / "bin" / "python",
        "#!/bin/sh\necho 'checking the stubs'\necho 'epoxi/v1 is out of date: email_pb2.py' >&2\nexit 3\n",
    )
    (tmp_path / ".venv" / ".epoxi-installed").touch()
    executable(tmp_path / "node_modules" / ".bin" / "buf", "#!/bin/sh\n")
    tools = tmp_path / "tools"
    for tool in ("dnsmasq", "strace"):
        executable(tools / tool, "#!/bin/sh\n")

    code, out = await run(tmp_path / "scripts" / "bootstrap", f"{tools}:/usr/bin:/bin")
    assert code != 0
    assert "checking the stubs" in out
    assert "epoxi/v1 is out of date: email_pb2.py" in out
