"""Every command the README and docs/ show still parses, names files that exist, and the
cheap ones (validate, --check, --help) run here; `run`, `demo`, `eval`, `report` and
`submit` are run for real by their own tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline.__main__ import main, parse_args

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = (
    "python -m pipeline ",
    ".venv/bin/pipeline ",
    "pipeline ",
    ".venv/bin/python -m pipeline ",
)
RUN_HERE = ("validate", "schemas", "render-k8s")


def _shell_lines(text: str) -> list[str]:
    """Lines of the ```bash / ```sh / ```console blocks, comments and `$ ` prompts removed."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _pipeline_argv(line: str) -> list[str] | None:
    """The `pipeline` arguments of a documented line, optional `[...]` parts dropped."""
    line = line.split(" -- ", 1)[1] if line.startswith("ray job submit") else line
    for prefix in PREFIXES:
        if line.startswith(prefix):
            rest = re.sub(r"\[[^\]]*\]", " ", line[len(prefix) :])
            words = shlex.split(rest)
            ends = [i for i, w in enumerate(words) if w in {"|", "&&", ";", ">", ">>", "||"}]
            return words[: ends[0]] if ends else words
    return None


COMMANDS = [
    (doc.relative_to(REPO).as_posix(), argv)
    for doc in DOCS
    for line in _shell_lines(doc.read_text())
    if (argv := _pipeline_argv(line)) is not None
]
MAKE_TARGETS = [
    (doc.relative_to(REPO).as_posix(), line.split()[1])
    for doc in DOCS
    for line in _shell_lines(doc.read_text())
    if line.startswith("make ")
]


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize(
    ("doc", "argv"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else v
)
def test_documented_command_parses_and_its_files_exist(doc: str, argv: list[str]) -> None:
    args = parse_args(argv)
    assert args.command == argv[0]
    for arg in argv[1:]:
        if re.fullmatch(r"(jobs|tests|infra|pipeline)/[\w./-]+\.ya?ml", arg):
            assert (REPO / arg).is_file(), (
                f"{doc}: {' '.join(argv)} names {arg}, which is not in the repo"
            )


@pytest.mark.parametrize(
    ("doc", "argv"),
    [c for c in COMMANDS if c[1][0] in RUN_HERE],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_cheap_documented_command_runs(
    doc: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if argv[0] in ("schemas", "render-k8s") and "--check" not in argv:
        argv = [*argv, "--check"]  # never rewrite the repo from a test
    argv = [a for a in argv if a != "--deep"]  # --deep reads the spec's storage: not here
    monkeypatch.chdir(REPO)
    assert main(argv) == 0, f"{doc}: {' '.join(argv)}\n{capsys.readouterr()}"


@pytest.mark.parametrize(("doc", "target"), MAKE_TARGETS)
def test_documented_make_target_exists(doc: str, target: str) -> None:
    assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), flags=re.M), (
        f"{doc}: make {target}"
    )
