"""Every code block of README.md and of the documentation pages (docs/**/*.md) is checked, so
a snippet cannot drift from the package:

- a ``python`` block runs as it stands (in a fresh namespace; it must define everything it
  uses), with no FutureWarning;
- a ``python`` block after ``<!-- excerpt: PATH -->`` is an excerpt of that program (which the
  program tests run): its lines appear there in order, ``...`` marking left-out lines;
- every ``python PATH.py`` / ``python -m MODULE`` / ``torchrun ... PATH.py`` command in the
  other blocks, and in the prose's inline code, names a program that exists and accepts
  every ``--option`` the command gives (checked against its ``--help``);
- a block that only includes a file (``--8<-- "python/x.py"``, pymdownx.snippets) shows that
  file as it is; tests/test_docs.py checks the file exists and that a test runs it. A
  README section included into a page (``--8<-- "README.md:name"``) is checked here as part
  of README.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- excerpt: (?P<src>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
                   re.S)


SNIPPET_ONLY = re.compile(r'\s*--8<-- "[^"]+"\s*')
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))


def _blocks() -> list[tuple[str, str, str | None, str]]:
    """``(where, language, excerpt source, body)`` of every fenced block; a block that only
    includes a file is left to tests/test_docs.py."""
    out = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for m in BLOCK.finditer(text):
            if SNIPPET_ONLY.fullmatch(m.group("body")):
                continue
            line = text[:m.start("body")].count("\n") + 1
            out.append((f"{page}:{line}", m.group("lang"), m.group("src"), m.group("body")))
    return out


BLOCKS = _blocks()
PYTHON = [(ln, body) for ln, lang, src, body in BLOCKS if lang == "python" and src is None]
EXCERPTS = [(ln, src, body) for ln, lang, src, body in BLOCKS if lang == "python" and src]
SHELL = [(ln, body) for ln, lang, src, body in BLOCKS if lang in ("", "bash", "sh")]


def test_readme_has_the_blocks_this_test_checks():
    readme = [b for b in BLOCKS if b[0].startswith("README.md:")]
    assert sum(1 for b in readme if b[1] == "python" and b[2] is None) >= 1
    assert sum(1 for b in readme if b[1] in ("", "bash", "sh")) >= 3
    assert len(PYTHON) >= 5 and len(EXCERPTS) >= 2 and len(SHELL) >= 10
    assert any(w.startswith("docs/") for w, _ in PYTHON)  # the pages' blocks are in


@pytest.mark.parametrize("line,code", PYTHON, ids=[ln for ln, _ in PYTHON])
def test_python_block_runs(line, code):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(compile(code, line, "exec"), {"__name__": "readme"})
    future = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert not future, future


@pytest.mark.parametrize("line,src,code", EXCERPTS, ids=[ln for ln, _, _ in EXCERPTS])
def test_excerpt_matches_its_program(line, src, code):
    program = [ln.strip() for ln in (ROOT / src).read_text().splitlines()]
    at = 0
    for want in textwrap.dedent(code).splitlines():
        want = want.strip()
        if not want or want == "...":
            continue
        try:
            at = program.index(want, at) + 1
        except ValueError:
            pytest.fail(f"{line}: {want!r} is not in {src} (after line {at})")


def _commands(body: str) -> list[list[str]]:
    """The program invocations of a shell block: ``python X.py``, ``python -m M``,
    ``torchrun ... X.py`` (each line, or each ``&&``-joined part of one)."""
    cmds = []
    for raw in body.splitlines():
        for part in raw.split("#", 1)[0].split("&&"):
            words = shlex.split(part)
            if not words:
                continue
            if words[0] == "torchrun":
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script is not None:
                    cmds.append(["python", *words[script:]])
            elif words[0] in ("python", "python3"):
                cmds.append(words)
    return cmds


def _inline() -> list[tuple[str, str]]:
    """Commands written inline in the prose (`python ...`, `torchrun ...`)."""
    out = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        out += [(f"{page}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
                for m in re.finditer(r"(?<!`)`((?:python3?|torchrun) [^`]+)`(?!`)",
                                     text.replace("\n", " "))]
    return out


SHELL_COMMANDS = [(ln, cmd) for ln, body in SHELL + _inline() for cmd in _commands(body)
                  if cmd[1] != "-c" and (cmd[1] != "-m" or cmd[2] not in ("venv", "pytest", "pip"))]


@pytest.mark.parametrize("line,cmd", SHELL_COMMANDS,
                         ids=[f"{ln}:{' '.join(c[1:3])}" for ln, c in SHELL_COMMANDS])
def test_shell_command_names_a_program_and_its_options(line, cmd):
    target = cmd[1:3] if cmd[1] == "-m" else cmd[1:2]
    if target[0] != "-m":
        assert (ROOT / target[0]).exists(), f"{line}: no {target[0]}"
    options = [w.split("=", 1)[0] for w in cmd if w.startswith("--")]
    if not options:
        return
    done = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    missing = [o for o in options if o not in done.stdout]
    assert not missing, f"{line}: {' '.join(target)} has no option {missing}"


def _written_signatures() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = " ".join((ROOT / page).read_text().split())
        found += [(page, m.group(1)) for m in re.finditer(
            r"`MTLSAM\((shared, base_optimizer, \*, .*?\*\*base_kwargs)\)`", text)]
    return found


@pytest.mark.parametrize("page,signature", _written_signatures() or [(None, None)])
def test_api_signature_lists_every_argument_with_its_default(page, signature):
    """A ``MTLSAM(...)`` signature written in README or on a page names every constructor
    argument, in order, with the default the code has. (The API page renders the signature
    from the code itself; tests/test_docs.py checks its descriptions.)"""
    import inspect

    from mtlsam_ext import MTLSAM

    if signature is None:
        pytest.skip("no signature is written out by hand")
    written = [a.strip() for a in signature.split(",")]
    params = list(inspect.signature(MTLSAM.__init__).parameters.values())[1:]
    names = [w.split("=", 1)[0] for w in written if w != "*"]
    want = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in params]
    assert names == want, page
    assert written.index("*") == next(i for i, p in enumerate(params) if p.kind is p.KEYWORD_ONLY)
    for w in written:
        if "=" in w:
            name, value = w.split("=", 1)
            default = inspect.signature(MTLSAM.__init__).parameters[name].default
            assert ast.literal_eval(value) == default, (page, name, value, default)
