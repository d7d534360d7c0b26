"""Generate the epoxi.v1 Python stubs from protos/, or check that the committed ones match.

    python scripts/genprotos.py          # regenerate epoxi/v1/, refresh protos/google/api/
    python scripts/genprotos.py --check  # exit 1 when either is out of date

protos/google/api/{annotations,http,httpbody}.proto are vendored from the googleapis-common-protos
wheel and committed, so buf needs no network and `buf breaking --against .git#...` finds
them in history. --check fails when they differ from the installed wheel's copies.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "epoxi" / "v1"
VENDORED = PROTOS / "google" / "api"
VENDORED_NAMES = ("annotations.proto", "http.proto", "httpbody.proto")


def wheel_google_api() -> Path:
    return Path(google.api.__path__[0])


def vendored_drift() -> list[str]:
    """Files of protos/google/api that are missing, extra, or differ from the wheel's copies."""
    present = {p.name for p in VENDORED.glob("*")} if VENDORED.is_dir() else set()
    drift = sorted(present - set(VENDORED_NAMES))
    for name in VENDORED_NAMES:
        ours, theirs = VENDORED / name, wheel_google_api() / name
        if not ours.is_file() or not filecmp.cmp(theirs, ours, False):
            drift.append(name)
    return drift


def refresh_vendored() -> None:
    VENDORED.mkdir(parents=True, exist_ok=True)
    for name in VENDORED_NAMES:
        shutil.copyfile(wheel_google_api() / name, VENDORED / name)


def generate(out_root: Path) -> None:
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "epoxi").rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{wkt}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        # quiet: no "Writing mypy to ..." line per file on stderr.
        f"--mypy_out=quiet:{out_root}",
        f"--mypy_grpc_out=quiet:{out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out_root / "epoxi" / "v1" / "__init__.py").write_text(
        '"""Generated from protos/epoxi/v1; do not edit."""\n'
    )


def differences(a: Path, b: Path) -> list[str]:
    names = {p.name for p in a.glob("*.py*")} | {p.name for p in b.glob("*.py*")}
    return sorted(
        n for n in names if not ((a / n).exists() and (b / n).exists() and filecmp.cmp(a / n, b / n, False))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail when epoxi/v1 differs from protos/ or protos/google/api from the wheel",
    )
    args = parser.parse_args()
    if args.check:
        drift = vendored_drift()
        if drift:
            print(
                "protos/google/api differs from the googleapis-common-protos wheel"
                " (run scripts/genprotos.py):",
                *drift,
                file=sys.stderr,
            )
            return 1
    else:
        refresh_vendored()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "epoxi" / "v1"
        if args.check:
            stale = differences(fresh, OUT)
            if stale:
                print(
                    "epoxi/v1 is out of date with protos/ (run scripts/genprotos.py):",
                    *stale,
                    file=sys.stderr,
                )
                return 1
            print("epoxi/v1 matches protos/")
            return 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"generated {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
