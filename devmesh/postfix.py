"""Throwaway Postfix instances on loopback: a relay to one SMTP server, and a receiving server.

Each has its own ``config_directory``, ``queue_directory`` and ``data_directory`` under a
directory of its own; smtpd on a free 127.0.0.1 port (master.cf), no DNS, no chroot, its log
in ``<dir>/maillog``. The system's Postfix (if any) is left alone and need not run.
``postfix -c DIR stop`` on exit, and the master is killed if it is still there.

- ``PostfixRelay`` relays everything to ``relayhost = [127.0.0.1]:PORT`` (the benchmarks'
  baseline), with no local delivery.
- ``PostfixReceiver`` is the final destination of one domain: virtual(8) delivers into a
  maildir per known user under ``<dir>/mail``; a recipient not listed is refused with
  ``550 5.1.1``, and chosen ones with a chosen reply (``check_recipient_access``). It can hide
  PIPELINING and CHUNKING from its EHLO (``smtpd_discard_ehlo_keywords``). Address extensions
  (``user+tag@domain``) go to the user's maildir, and its ``Delivered-To`` names the full address.

The master runs as root and drops to ``mail_owner``, so both need root, and every parent of the
directory must be reachable by user postfix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Self

from devmesh.started import Started

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
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# What every instance shares: its own directories, loopback only, no DNS, no local delivery.
_COMMON_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
command_directory = {command_directory}
daemon_directory = {daemon_directory}
meta_directory = {meta_directory}
shlib_directory = {shlib_directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydomain = {hostname}
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
disable_dns_lookups = yes
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtpd_banner = $myhostname ESMTP
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
"""

_RELAY_CF = """\
relayhost = [{relay_host}]:{relay_port}
default_process_limit = {process_limit}
default_destination_concurrency_limit = {concurrency}
smtp_destination_concurrency_limit = {concurrency}
"""

_RECEIVER_CF = """\
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {dir}/mail
virtual_mailbox_maps = texthash:{dir}/conf/mailboxes
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
recipient_delimiter = +
smtpd_recipient_restrictions = check_recipient_access texthash:{dir}/conf/refusals
smtputf8_enable = yes
smtpd_discard_ehlo_keywords = {discard}
# Headers arrive as sent: no rewriting, nothing added for clients on 127.0.0.1.
local_header_rewrite_clients =
# No notices to a postmaster (there is none).
notify_classes =
"""

_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
_DISCONNECT = re.compile(r"postfix/smtpd\[\d+\]: disconnect from [^\[\s]*\[([^\]]+)\]((?: \w+=[\d/]+)+)")


class _Postfix(Started):
    """One instance: ``async with X(...) as pf`` starts it (stopping it if that fails), and stops it."""

    hostname = "postfix.epoxi.test"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
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

    @property
    def log(self) -> Path:
        return self.dir / "maillog"

    def _settings(self) -> str:
        """This kind of instance's part of main.cf."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Files and directories this kind needs before Postfix starts."""

    async def start(self) -> Self:
        self.port = _free_port()
        for sub in ("conf", "queue", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", owner.pw_uid, owner.pw_gid)
        defaults = {
            name: (await _run("postconf", "-dh", name)).strip()
            for name in ("command_directory", "daemon_directory", "meta_directory", "shlib_directory")
        }
        common = _COMMON_CF.format(dir=self.dir, hostname=self.hostname, **defaults)
        (self.conf / "main.cf").write_text(common + self._settings())
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=self.address))
        self._prepare()
        self._started = True
        try:
            await _run("postfix", "-c", str(self.conf), "start")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.log_tail()}") from None
        return self

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no maillog)"

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


class PostfixRelay(_Postfix):
    """``async with PostfixRelay(tmp, relay="127.0.0.1:2525", concurrency=200) as pf: pf.address``."""

    hostname = "postfix.bench.test"

    def __init__(self, directory: Path, relay: str, concurrency: int) -> None:
        super().__init__(directory)
        self.relay = relay
        self.concurrency = concurrency

    def _settings(self) -> str:
        relay_host, _, relay_port = self.relay.rpartition(":")
        return _RELAY_CF.format(
            relay_host=relay_host,
            relay_port=relay_port,
            concurrency=self.concurrency,
            process_limit=max(100, self.concurrency + 50),
        )


class PostfixReceiver(_Postfix):
    """The final destination of ``domain``: a maildir for each of ``users`` (local parts);
    ``refusals`` maps an address to the reply that refuses it (``"452 4.2.2 Mailbox full"``),
    which Postfix sends as ``<address>: Recipient address rejected: Mailbox full``.
    ``hide`` names EHLO keywords not to offer (``("pipelining", "chunking")``).
    Mail is stored as ``mailbox_owner``."""

    def __init__(
        self,
        directory: Path,
        domain: str,
        users: Iterable[str],
        refusals: Mapping[str, str] | None = None,
        hide: Iterable[str] = (),
        mailbox_owner: str = "nobody",
    ) -> None:
        super().__init__(directory)
        self.domain = domain
        self.users = list(users)
        self.refusals = dict(refusals or {})
        self.hide = [k.lower() for k in hide]
        self.mailbox_owner = pwd.getpwnam(mailbox_owner)

    @property
    def mail(self) -> Path:
        return self.dir / "mail"

    def _settings(self) -> str:
        return _RECEIVER_CF.format(
            dir=self.dir,
            domain=self.domain,
            uid=self.mailbox_owner.pw_uid,
            gid=self.mailbox_owner.pw_gid,
            discard=", ".join(self.hide),
        )

    def _prepare(self) -> None:
        self.dir.chmod(0o755)  # the daemons, as user postfix, reach their queue through it
        self.mail.mkdir(exist_ok=True)
        os.chown(self.mail, self.mailbox_owner.pw_uid, self.mailbox_owner.pw_gid)
        (self.conf / "mailboxes").write_text(
            "".join(f"{user}@{self.domain} {user}/\n" for user in self.users), encoding="utf-8"
        )
        (self.conf / "refusals").write_text(
            "".join(f"{address} {reply}\n" for address, reply in self.refusals.items()), encoding="utf-8"
        )

    def queued(self) -> int:
        """Messages in the queue (accepted, not yet delivered or given up on)."""
        queue = self.dir / "queue"
        return sum(1 for name in _QUEUES for p in (queue / name).rglob("*") if p.is_file())

    async def settled(self, seconds: float = 30.0) -> None:
        """Wait until every message accepted so far has left the queue (smtpd accepts a message
        only once it is in the queue, so a message accepted before this call is delivered after it)."""
        deadline = time.monotonic() + seconds
        while self.queued():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.queued()} messages still queued after {seconds}s\n{self.log_tail()}"
                )
            await asyncio.sleep(0.02)

    def sessions(self) -> list[tuple[str, dict[str, str]]]:
        """Every SMTP session smtpd has ended so far: the client's IP, and its command counts as
        smtpd logs them at disconnect (``{"mail": "2", "rcpt": "3/5", "data": "2", ...}``: done,
        or accepted/sent; a command never sent is absent)."""
        found = []
        for m in _DISCONNECT.finditer(self.log.read_text(errors="replace") if self.log.exists() else ""):
            counts = dict(c.split("=", 1) for c in m.group(2).split())
            found.append((m.group(1), counts))
        return found

    def mailbox(self, user: str) -> list[bytes]:
        """The messages delivered to ``user``'s maildir, by file time (ties by name), as stored (LF line ends,
        with Postfix's Return-Path, Delivered-To and Received in front)."""
        new = self.mail / user / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _run(*args: str) -> str:
    # Postfix writes its errors to stderr only when that is a terminal; otherwise to syslog
    # (absent in containers) or maillog_file. On failure, look at <dir>/maillog.
    # Its warnings (postconf's about a missing /etc/postfix/master.cf, when the system's Postfix
    # has no configuration) are kept apart from the output.
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = (out + err).decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {text}")
    return out.decode(errors="replace")
