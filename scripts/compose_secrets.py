"""Make the development secrets docker-compose.yml reads from secrets/ (see secrets/README.md).

    .venv/bin/python scripts/compose_secrets.py          # make what is missing
    .venv/bin/python scripts/compose_secrets.py --force  # make everything again

Written, each readable by its owner only (0600):

* ``consul-management-token``: Consul's ``acl.tokens.initial_management`` (a UUID);
* ``ca.pem``: the mesh's CA (its key is not kept: ``--force`` makes a new CA and new certificates);
* ``mesh.pem``/``mesh-key.pem``: the certificate every Epoxi service serves and presents (mTLS),
  for each compose host name, ``localhost`` and ``127.0.0.1`` (the healthchecks dial that);
* ``consul.pem``/``consul-key.pem``: Consul's, presented by its TLS gRPC health checks;
* ``epoxi-tokens``: the bearer tokens the services accept (``EPOXI_TOKENS_FILE``): ``mesh``
  (every scope; the one the services send to each other, also in ``epoxi-mesh-token``) and
  ``operator`` (read, submit and admin; also in ``operator-token``);
* ``ingress-users.toml`` and ``ingress-app-password``: the SMTP user ``app`` and its password.

Nothing here is for production: one certificate for every service, a CA key thrown away, and
tokens in plain files on the machine that runs compose.
"""

from __future__ import annotations

import argparse
import os
import secrets
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devmesh import certs
from services.ingress.passwords import hash_password

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "secrets"
# The compose services' host names (docker-compose.yml), and what the healthchecks dial.
MESH_HOSTS = ("node1", "node2", "router", "monitor", "gateway", "ingress", "localhost")
CONSUL_HOSTS = ("consul", "localhost")
LOCAL_IPS = ("127.0.0.1",)
VALID_DAYS = 365


def write(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only, never briefly readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certificates(directory: Path) -> None:
    ca = certs.make_ca("Epoxi compose CA", days=VALID_DAYS)
    write(directory / "ca.pem", _pem(ca.cert))
    for stem, hosts in (("mesh", MESH_HOSTS), ("consul", CONSUL_HOSTS)):
        # Server and client: each service both serves and dials over mutual TLS.
        issued = certs.issue(ca, f"epoxi {stem}", hosts=hosts, ips=LOCAL_IPS, days=VALID_DAYS)
        write(directory / f"{stem}.pem", _pem(issued.cert))
        write(directory / f"{stem}-key.pem", _key_pem(issued.key))


def make_tokens(directory: Path) -> None:
    mesh, operator = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    lines = [
        "# name     scopes                    token",
        f"mesh       mesh,read,submit,admin    {mesh}",
        f"operator   read,submit,admin         {operator}",
    ]
    write(directory / "epoxi-tokens", ("\n".join(lines) + "\n").encode())
    write(directory / "epoxi-mesh-token", f"{mesh}\n".encode())
    write(directory / "operator-token", f"{operator}\n".encode())


def make_ingress_user(directory: Path) -> None:
    password = secrets.token_urlsafe(18)
    users = f'[users.app]\npassword = "{hash_password(password)}"\n'
    write(directory / "ingress-users.toml", users.encode())
    write(directory / "ingress-app-password", f"{password}\n".encode())


MAKERS = {
    "consul-management-token": lambda d: write(d / "consul-management-token", f"{uuid.uuid4()}\n".encode()),
    "ca.pem": make_certificates,
    "epoxi-tokens": make_tokens,
    "ingress-users.toml": make_ingress_user,
}


def generate(directory: Path, force: bool = False) -> list[str]:
    """Make each group of secrets whose first file is missing (all with ``force``); their names."""
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for name, make in MAKERS.items():
        if force or not (directory / name).exists():
            make(directory)
            made.append(name)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="make every secret again")
    parser.add_argument("--dir", type=Path, default=SECRETS, help="where to write (default secrets/)")
    args = parser.parse_args(argv)
    made = generate(args.dir, args.force)
    print(f"made {', '.join(made)} in {args.dir}" if made else f"{args.dir}: nothing missing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
