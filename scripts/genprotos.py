"""Generate the epoxi.v1 Python stubs from protos/, or check that the committed ones match.

    python scripts/genprotos.py          # regenerate epoxi/v1/
    python scripts/genprotos.py --check  # exit 1 when epoxi/v1/ is out of date

It also lays google/api/{annotations,http}.proto from the googleapis-common-protos wheel
under build/googleapis, the second module of buf.yaml, so `buf lint` needs no network.
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
GOOGLEAPIS = ROOT / "build" / "googleapis"


def lay_googleapis() -> Path:
    target = GOOGLEAPIS / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("annotations.proto", "http.proto"):
        shutil.copyfile(Path(google.api.__path__[0]) / name, target / name)
    return GOOGLEAPIS


def generate(out_root: Path) -> None:
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{lay_googleapis()}",
        f"-I{wkt}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
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
    parser.add_argument("--check", action="store_true", help="fail when epoxi/v1 differs from protos/")
    args = parser.parse_args()
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
