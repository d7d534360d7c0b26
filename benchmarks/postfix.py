"""A throwaway Postfix instance that relays everything to one loopback SMTP server.

Its own ``config_directory``, ``queue_directory`` and ``data_directory`` under a temporary
directory; smtpd on a free loopback port (master.cf), ``relayhost = [127.0.0.1]:PORT``, no DNS,
no local delivery, no chroot, its log in ``<dir>/maillog``. The system's Postfix (if any) is
left alone. ``postfix -c DIR stop`` on exit, and the master is killed if it is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
from pathlib import Path

from benchmarks._utils import Started, free_port

_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = {command_directory}
daemon_directory = {daemon_directory}
meta_directory = {meta_directory}
shlib_directory = {shlib_directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{relay_host}]:{relay_port}
disable_dns_lookups = yes
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtpd_banner = $myhostname ESMTP
default_process_limit = {process_limit}
default_destination_concurrency_limit = {concurrency}
smtp_destination_concurrency_limit = {concurrency}
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
"""


class PostfixRelay(Started):
    """``async with PostfixRelay(tmp, relay="127.0.0.1:2525", concurrency=200) as pf: pf.address``."""

    def __init__(self, directory: Path, relay: str, concurrency: int) -> None:
        self.dir = directory
        self.relay = relay
        self.concurrency = concurrency
        self.port = 0
        self._started = False

    @staticmethod
    def available() -> bool:
        if shutil.which("postfix") is None or shutil.which("postconf") is None:
            return False
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return False
        return os.geteuid() == 0  # the master runs as root and drops to mail_owner

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.dir / "conf"

    async def _postconf(self, name: str) -> str:
        out = await _run("postconf", "-dh", name)
        return out.strip()

    async def start(self) -> PostfixRelay:
        self.port = free_port()
        relay_host, _, relay_port = self.relay.rpartition(":")
        for sub in ("conf", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", owner.pw_uid, owner.pw_gid)
        defaults = {
            name: await self._postconf(name)
            for name in ("command_directory", "daemon_directory", "meta_directory", "shlib_directory")
        }
        (self.conf / "main.cf").write_text(
            _MAIN_CF.format(
                dir=self.dir,
                relay_host=relay_host,
                relay_port=relay_port,
                concurrency=self.concurrency,
                process_limit=max(100, self.concurrency + 50),
                **defaults,
            )
        )
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=self.address))
        self._started = True
        try:
            await _run("postfix", "-c", str(self.conf), "start")
        except RuntimeError as e:
            log = self.dir / "maillog"
            detail = log.read_text()[-2000:] if log.exists() else "(no maillog)"
            raise RuntimeError(f"{e}\n{detail}") from None
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        pid = self.master_pid()
        with contextlib.suppress(RuntimeError):
            await _run("postfix", "-c", str(self.conf), "stop")
        if pid is not None:
            for _ in range(50):
                if not _alive(pid):
                    return
                await asyncio.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _run(*args: str) -> str:
    # Postfix writes its errors to stderr only when that is a terminal; otherwise to syslog
    # (absent in containers) or maillog_file. On failure, look at <dir>/maillog.
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {text.strip()}")
    return text
