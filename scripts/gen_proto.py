"""Regenerate gen/ from proto/, check that gen/ is up to date, or lint proto/.

gen/ holds the Python modules, the descriptor set Envoy transcodes with, and openapi.yaml, the
OpenAPI document of the REST surface (written by scripts/gen_openapi.py from the descriptor set).

    python scripts/gen_proto.py          # rewrite gen/ (make gen)
    python scripts/gen_proto.py --check  # exit 1 if gen/ is stale (used by a test)
    python scripts/gen_proto.py --lint   # buf lint, STANDARD rules (make lint-proto)

Everything comes from the Python environment, so nothing needs the network:
protoc is grpcio-tools' bundled one (run as `python -m grpc_tools.protoc`),
google/protobuf/*.proto come from grpc_tools' `_proto` dir, google/api and
google/rpc come from the installed googleapis-common-protos package, and buf
comes from the buf-bin package. The generated files therefore depend on the
installed versions of grpcio-tools and googleapis-common-protos: upgrading
either may change gen/, which `--check` will then report.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "gen"
# Git-ignored copy of the googleapis protos: the second module of the buf
# workspace in buf.yaml, because buf cannot fetch googleapis from the BSR here.
DEPS_DIR = ROOT / "build" / "proto-deps"
DESCRIPTOR_SET = "welltegra_ingest.binpb"
OPENAPI = "openapi.yaml"
OPENAPI_SCRIPT = ROOT / "scripts" / "gen_openapi.py"
# Not imported by our protos, but added to the descriptor set so that Envoy's
# gRPC-JSON transcoder can render google.rpc.Status details of errors.
DESCRIPTOR_EXTRAS = ("google/rpc/status.proto", "google/rpc/error_details.proto")
# Directories copied into DEPS_DIR for buf (top-level *.proto files only).
DEPS_PACKAGES = ("google/api", "google/rpc")
# Bytecode caches appear in gen/ once the package is imported; not generated.
IGNORED_NAMES = {"__pycache__"}


def googleapis_root() -> Path:
    """The site-packages root holding googleapis-common-protos' google/api/*.proto."""
    # google.api is a namespace package (no __file__); ask for its directories
    # without importing it.
    spec = importlib.util.find_spec("google.api")
    locations = (spec.submodule_search_locations or []) if spec else []
    for entry in locations:
        if (Path(entry) / "annotations.proto").is_file():
            return Path(entry).parent.parent
    sys.exit("gen_proto: google/api/annotations.proto not found; install googleapis-common-protos")


def wkt_root() -> Path:
    """grpc_tools' bundled include dir with google/protobuf/*.proto."""
    import grpc_tools  # type: ignore[import-untyped]  # ships no type hints

    return Path(grpc_tools.__file__).parent / "_proto"


def find_buf() -> Path | None:
    """The buf binary of this environment (buf-bin installs it as a script), else PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "buf"
    if candidate.is_file():
        return candidate
    found = shutil.which("buf")
    return Path(found) if found else None


def protoc(*args: str) -> None:
    """Run grpc_tools' protoc from proto/, so our inputs are plain relative names."""
    includes = [PROTO_DIR, googleapis_root(), wkt_root()]
    cmd = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{p}" for p in includes), *args]
    result = subprocess.run(cmd, cwd=PROTO_DIR)
    if result.returncode != 0:
        sys.exit(f"gen_proto: protoc failed ({result.returncode}): {' '.join(cmd)}")


def proto_sources() -> list[str]:
    """The .proto files under proto/, relative to it."""
    # Sorted so the command line, and hence the output, never depends on
    # directory listing order.
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def write_descriptor_set(path: Path) -> None:
    """The descriptor set Envoy transcodes with: imports, extras, and comments (source info)."""
    # A separate run from the Python one: the extras must be in the descriptor set but must
    # not get Python modules here (googleapis-common-protos already provides them).
    protoc(
        f"--descriptor_set_out={path}",
        "--include_imports",
        "--include_source_info",
        *proto_sources(),
        *DESCRIPTOR_EXTRAS,
    )


def generate(out: Path) -> None:
    """Write the complete generated tree into the empty directory `out`."""
    sources = proto_sources()
    protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources)
    write_descriptor_set(out / DESCRIPTOR_SET)
    # protoc writes no __init__.py; make every directory holding modules a
    # regular package so setuptools, mypy and pytest all see the same thing.
    for module in list(out.rglob("*.py")):
        package = module.parent
        while package != out:
            (package / "__init__.py").touch()
            package = package.parent
    openapi(out)


def openapi(out: Path) -> None:
    """Write out/openapi.yaml from out's descriptor set, importing out's fresh modules."""
    # The generator imports ingest_service, which imports welltegra.*: `out` first on the path
    # makes that the new code, so a missing or broken gen/ cannot stop its own regeneration.
    # No bytecode, so no __pycache__ is written into `out` and then copied to gen/.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(out), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [sys.executable, str(OPENAPI_SCRIPT), str(out / DESCRIPTOR_SET), str(out / OPENAPI)]
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"gen_proto: {OPENAPI_SCRIPT.name} failed ({result.returncode})")


def tree(root: Path) -> set[str]:
    """Relative paths of the files under root, minus bytecode caches."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not IGNORED_NAMES.intersection(p.relative_to(root).parts)
    }


def check() -> int:
    """Regenerate into a temp dir and list every file that differs from gen/."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected = tree(fresh)
        actual = tree(GEN_DIR) if GEN_DIR.is_dir() else set()
        stale = sorted(
            [(f, "missing") for f in expected - actual]
            + [(f, "extra") for f in actual - expected]
            + [
                (f, "differs")
                for f in expected & actual
                if not filecmp.cmp(fresh / f, GEN_DIR / f, shallow=False)
            ]
        )
    if stale:
        print("gen/ is stale against proto/; run `make gen`:")
        for name, problem in stale:
            print(f"  {problem:8} gen/{name}")
        return 1
    print("gen/ is up to date")
    return 0


def regenerate() -> int:
    """Replace gen/ wholesale, so files of deleted or renamed protos disappear."""
    # Generate aside first: a protoc error leaves the committed gen/ untouched.
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh subdirectory, not tmp itself: copytree copies the directory
        # mode, and tmp is private (0700).
        fresh = Path(tmp) / "gen"
        fresh.mkdir()
        generate(fresh)
        shutil.rmtree(GEN_DIR, ignore_errors=True)
        shutil.copytree(fresh, GEN_DIR)
    print(f"regenerated {GEN_DIR.relative_to(ROOT)}/")
    return 0


def prepare_deps() -> None:
    """Mirror the installed googleapis protos into DEPS_DIR for buf."""
    # Wiped first so a package upgrade never leaves orphaned files behind.
    shutil.rmtree(DEPS_DIR, ignore_errors=True)
    source_root = googleapis_root()
    for package in DEPS_PACKAGES:
        target = DEPS_DIR / package
        target.mkdir(parents=True)
        for proto in sorted((source_root / package).glob("*.proto")):
            shutil.copyfile(proto, target / proto.name)
    # buf ships google/protobuf/*.proto itself; copying them would clash.


def lint() -> int:
    """Run `buf lint` on the workspace in buf.yaml (proto/ with STANDARD rules)."""
    buf = find_buf()
    if buf is None:
        print("gen_proto: buf not found; install the dev extra (buf-bin)", file=sys.stderr)
        return 2
    prepare_deps()
    result = subprocess.run([str(buf), "lint"], cwd=ROOT)
    if result.returncode == 0:
        print("buf lint: ok")
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    mode.add_argument("--lint", action="store_true", help="run buf lint on proto/")
    args = parser.parse_args()
    if args.check:
        return check()
    if args.lint:
        return lint()
    return regenerate()


if __name__ == "__main__":
    sys.exit(main())
