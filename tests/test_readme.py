"""The README's code as a user runs it: every ```python block executes as written, every fastdiff command
in a ```bash block parses, and the commands and paths the README names exist, so the README cannot rot.

A block runs in a fresh namespace in an empty working folder, after the set-up blocks of its section (a block
whose first line starts with ``# Set-up``), as a user pastes them in order. A block whose first line says
``needs a CUDA GPU`` is skipped, with that reason, where there is none.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where the code starts in README.md (1-based)
    section: str  # the `## ` heading it is under

    @property
    def first_line(self) -> str:
        return self.code.lstrip().splitlines()[0] if self.code.strip() else ""

    @property
    def is_setup(self) -> bool:
        return self.first_line.lower().startswith("# set-up")

    @property
    def needs_cuda(self) -> bool:
        return "needs a cuda gpu" in self.first_line.lower()


def readme_blocks(text: str) -> list[Block]:
    blocks, section, lang, start, lines = [], "", None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if lang is None:
            if line.startswith("## "):
                section = line[3:].strip()
            m = re.match(r"^```(\w*)\s*$", line)
            if m:
                lang, start, lines = m.group(1), i + 1, []
        elif line.startswith("```"):
            blocks.append(Block(lang, "\n".join(lines) + "\n", start, section))
            lang = None
        else:
            lines.append(line)
    assert lang is None, f"README.md: the code block opened at line {start - 1} is never closed"
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def test_readme_has_code_blocks():
    assert len(PYTHON) >= 5 and len(BASH) >= 5, "README.md: code blocks not found; the parser or the README changed"
    assert all(b.lang in ("python", "bash", "") for b in BLOCKS), sorted({b.lang for b in BLOCKS})


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.needs_cuda and not torch.cuda.is_available():
        pytest.skip(f"README.md:{block.line} needs a CUDA GPU (its first line says so); none here")
    setup = [b for b in PYTHON if b.section == block.section and b.is_setup and b.line < block.line]
    monkeypatch.chdir(tmp_path)  # files the examples write land here
    # a user's environment: conftest's TRITON_INTERPRET=1 would make `auto` run the Triton interpreter on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    namespace: dict = {"__name__": "__readme__"}
    for b in [*setup, block]:
        exec(compile(b.code, f"README.md:{b.line}", "exec"), namespace)


# ------------------------------------------------------------------ bash


def _commands(block: Block) -> list[list[str]]:
    """Each command of a bash block as its words: continuation lines joined, comments dropped, `&&` split."""
    text = re.sub(r"\\\n", " ", block.code)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", "||", ";"):
                if cmd:
                    commands.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return commands


def _fastdiff_args(words: list[str]) -> list[str] | None:
    """The arguments of a fastdiff invocation (``fastdiff ...``, ``python -m fastdiff ...``,
    ``torchrun ... -m fastdiff ...``), or None when the command is something else."""
    if words[0] == "fastdiff":
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "fastdiff":
            return words[i + 2 :]
    return None


BASH_COMMANDS = [(b, c) for b in BASH for c in _commands(b)]
FASTDIFF_COMMANDS = [(b, _fastdiff_args(c)) for b, c in BASH_COMMANDS if _fastdiff_args(c) is not None]


def test_readme_names_fastdiff_commands():
    subcommands = {args[0] for _, args in FASTDIFF_COMMANDS if args}
    assert {"sample", "generate"} <= subcommands, subcommands


@pytest.mark.parametrize(
    "block,args", FASTDIFF_COMMANDS, ids=[f"README.md:{b.line}:{' '.join(a)[:40]}" for b, a in FASTDIFF_COMMANDS]
)
def test_fastdiff_command_parses(block: Block, args: list[str]):
    """The command line parses as written (the run itself is the CLI tests' job: these would take minutes)."""
    from fastdiff import cli

    try:
        cli.build_parser().parse_args(cli._drop_separator(list(args)))
    except SystemExit as exc:
        pytest.fail(f"README.md:{block.line}: `fastdiff {' '.join(args)}` does not parse (exit {exc.code})")


def test_repository_paths_exist_and_none_outside():
    """Scripts and files the bash blocks run exist in the repository; no code block reaches outside it."""
    for b in BLOCKS:
        assert not re.search(r"(^|[\s\"'=(])\.\./", b.code), f"README.md:{b.line}: a path outside the repository"
        assert "/work/" not in b.code, f"README.md:{b.line}: a path of this machine"
    for b, words in BASH_COMMANDS:
        for w in words:
            if re.match(r"^(scripts|tests|benchmarks|docs|csrc|fastdiff)/", w) and "*" not in w:
                path = w.split("::")[0]
                assert (ROOT / path).exists(), f"README.md:{b.line}: {path} does not exist"


def _readme_test_command() -> str:
    tests = [b for b in BASH if b.section == "Tests"]
    assert tests, "README.md has no bash block under `## Tests`"
    return tests[0].code.strip().splitlines()[0].split("#")[0].strip()


def test_ci_runs_the_readme_test_command():
    """CI runs the README's test command as written (then the long grids), so what the README promises is
    what CI checks."""
    command = _readme_test_command()
    assert command.startswith("python -m pytest"), command
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(line.strip() == command for line in ci.splitlines()), f".ci/run does not run `{command}`"


def test_wheel_outputs_are_ignored():
    """`pip wheel --no-deps -w dist .` (the README's command) and a plain `pip wheel .` leave nothing git sees."""
    assert any(c[:2] == ["pip", "wheel"] and "dist" in c for _, c in BASH_COMMANDS), "README: no pip wheel command"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["dist/fastdiff-0.0.0-py3-none-any.whl", "torch-2.13.0-cp311-none-any.whl", "build/lib/x.py"]
    out = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == paths, f"not ignored: {sorted(set(paths) - set(out.stdout.split()))}"


def test_license_file_matches_the_declared_license():
    """pyproject declares Apache-2.0; LICENSE holds that license's full text."""
    declared = re.search(r'^license = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    text = (ROOT / "LICENSE").read_text()
    assert declared and declared.group(1) == "Apache-2.0", declared
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "8. Limitation of Liability."):
        assert section in text, f"LICENSE lacks the section {section!r}"
    assert text.count("\n") > 150, "LICENSE is not the full text"
