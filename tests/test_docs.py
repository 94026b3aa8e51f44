"""The documentation site cannot go stale against the code:

- every error message a user can get from MTLSAM, its aggregators, its flat buffers, its
  backend choice and the kernels' self-check (``ValueError``, and the few ``RuntimeError``s)
  is on the Troubleshooting page (read from the source with ``ast``:
  the message's text with each interpolated value as ``…``), and every message the page lists
  still exists;
- every argument of ``MTLSAM.__init__`` has its own entry, with a description, in the
  docstring the API page is built from, in the signature's order;
- every program a page includes (``--8<-- "python/..."``) exists and is run by a test, and
  every included file exists;
- every page is in the navigation.

The pages' ``python`` blocks and commands are run and checked by tests/test_readme.py.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"

# Where the user-facing errors are raised.
SOURCES = sorted([*ROOT.glob("mtlsam_ext/optim/*.py"), *ROOT.glob("mtlsam_ext/aggregators/*.py"),
                  *ROOT.glob("mtlsam_ext/flat/*.py"), ROOT / "mtlsam_ext/ops/dispatch.py",
                  ROOT / "mtlsam_ext/ops/selfcheck.py"])
# Functions whose returned strings become (part of) an error message, and local helpers whose
# string argument is one: their text is listed like a raise's.
BUILDERS = {"nonfinite_message", "unsupported_reason", "finite_report", "refusal"}
RAISERS = {"refuse"}
ERRORS = {"ValueError", "BatchedError", "RuntimeError"}  # BatchedError is a ValueError
# Internal consistency checks no public call can reach (they guard the package's own calls).
INTERNAL = {
    "unresolved backend …",                                    # resolve_backend's own result
    "a phase's row blocks must be contiguous [R, N] tensors",  # rows MTLSAM allocates itself
    "…",                                                       # a message built elsewhere
}
HOLE = "…"


def _constants() -> dict[str, str]:
    """Module-level string constants of the package (``CONTRACT`` and the like)."""
    out: dict[str, str] = {}
    for path in sorted(ROOT.glob("mtlsam_ext/**/*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name):
                text = _text(node.value, {})
                if text is not None and HOLE not in text:
                    out[node.targets[0].id] = text
    return out


def _text(node: ast.AST, consts: dict[str, str]) -> str | None:
    """The message a string expression builds, ``…`` for every value only known at run time
    (None for an expression that is not a string at all)."""
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(v.value)
            elif isinstance(v.value, ast.Name) and v.value.id in consts:
                value = consts[v.value.id]
                parts.append(repr(value) if v.conversion == ord("r") else value)
            else:
                parts.append(HOLE)
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _text(node.left, consts), _text(node.right, consts)
        return None if a is None or b is None else a + b
    if isinstance(node, ast.Name) and node.id in consts:
        return consts[node.id]
    return HOLE


def _collapse(text: str) -> str:
    """Adjacent holes (``{a}{b}``, ``{a}...{b}`` with nothing between) read as one."""
    return re.sub(f"{HOLE}+", HOLE, " ".join(text.split()))


def _outer_strings(node: ast.AST, consts: dict[str, str]) -> list[ast.AST]:
    """The largest string expressions in ``node`` (a returned ``a if c else b`` gives both
    sides; the parts of a concatenation are not listed apart from it)."""
    text = _text(node, consts)
    if text is not None and text != HOLE:
        return [node] if len(text.strip()) >= 10 else []
    return [s for child in ast.iter_child_nodes(node) for s in _outer_strings(child, consts)]


def error_messages() -> dict[str, str]:
    """``{message pattern: "file:line"}`` of every error raised in SOURCES."""
    consts = _constants()
    found: dict[str, str] = {}

    def add(node: ast.AST, path: Path, line: int) -> None:
        text = _text(node, consts)
        if text is not None:
            found.setdefault(_collapse(text), f"{path.relative_to(ROOT)}:{line}")

    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) in ERRORS and node.exc.args:
                add(node.exc.args[0], path, node.lineno)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in RAISERS:
                add(node.args[0], path, node.lineno)
            elif isinstance(node, ast.FunctionDef) and node.name in BUILDERS:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return) and sub.value is not None:
                        for s in _outer_strings(sub.value, consts):
                            add(s, path, sub.lineno)
    return {m: where for m, where in found.items() if m not in INTERNAL}


def _page_messages() -> list[str]:
    """The messages the Troubleshooting page lists: the code span opening each table row."""
    out = []
    for line in TROUBLESHOOTING.read_text().splitlines():
        m = re.match(r"\| (`+) ?(.*?) ?\1 \|", line)
        if m:
            out.append(m.group(2))
    return out


def test_extractor_finds_the_messages_it_should():
    msgs = error_messages()
    assert len(msgs) > 80
    assert "method must be one of …, got …" in msgs  # an f-string
    assert any(m.startswith("gradients changed while the closure ran: the closure must run")
               for m in msgs)  # a constant from another module, resolved
    assert "non-finite values in the step (…); parameters left unchanged" in msgs  # a builder
    assert any(m.startswith("shared parameters sharded by fully_shard: …") for m in msgs)


def test_every_error_message_is_on_the_troubleshooting_page():
    listed = set(_page_messages())
    missing = {m: w for m, w in error_messages().items() if m not in listed}
    assert not missing, "not on docs/troubleshooting.md:\n" + "\n".join(
        f"  {w}: {m}" for m, w in sorted(missing.items(), key=lambda kv: kv[1]))


def test_the_troubleshooting_page_lists_no_message_the_code_lost():
    msgs = error_messages()
    listed = _page_messages()
    stale = [m for m in listed if m not in msgs]
    assert not stale, f"docs/troubleshooting.md lists messages the code no longer has: {stale}"
    assert len(listed) == len(set(listed)), "a message is listed twice"


def _docstring_args(doc: str) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: ``{name: description}``."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Args:") + 1
    args: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        m = re.match(r"    (\*{0,2}\w+):(.*)", line)
        if m:
            name = m.group(1)
            assert name not in args, f"{name} described twice"
            args[name] = m.group(2).strip()
        elif name is not None and line.strip():
            args[name] += " " + line.strip()
    return args


def test_every_mtlsam_argument_is_described_on_the_api_page():
    from mtlsam_ext import MTLSAM

    params = list(inspect.signature(MTLSAM.__init__).parameters.values())[1:]
    want = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in params]
    described = _docstring_args(MTLSAM.__doc__)
    assert list(described) == want  # each argument its own entry, in the signature's order
    short = [n for n, d in described.items() if len(d.split()) < 4]
    assert not short, f"arguments without a real description: {short}"
    assert "::: mtlsam_ext.MTLSAM" in (DOCS / "api" / "mtlsam.md").read_text()


SNIPPET = re.compile(r'^\s*--8<-- "([^"]+)"', re.M)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def test_included_files_exist_and_included_programs_are_tested():
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    included = {m.group(1).split(":", 1)[0] for p in _pages()
                for m in SNIPPET.finditer(p.read_text())}
    assert "python/lightning_two_task.py" in included
    for path in included:
        assert (ROOT / path).exists(), path
        if path.startswith("python/"):
            assert path in tests_text, f"{path} is shown in the docs but no test runs it"


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(p.relative_to(DOCS)) for p in _pages()
               if str(p.relative_to(DOCS)) not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("page", ["concepts.md", "aggregators.md", "design.md"])
def test_math_is_written_for_the_math_hook(page):
    """Formulas are ``$...$`` / ``$$...$$`` (converted to MathML at build time), never the
    unconverted ``\\(...\\)`` forms that would show as raw text."""
    text = (DOCS / page).read_text()
    assert "$" in text and "\\(" not in text and "\\[" not in text


def test_every_named_aggregator_has_its_section_and_api_entry():
    """An aggregator MTLSAM accepts by name has a section on the Aggregators page (formula,
    options, cost) and its function on the API page."""
    from mtlsam_ext.aggregators import AGGREGATORS

    page = (DOCS / "aggregators.md").read_text()
    api = (DOCS / "api" / "aggregators.md").read_text()
    headed = {name for heading in re.findall(r"^## (.*)", page, re.M)
              for name in re.findall(r"`(\w+)`", heading.split(":")[0])}
    for name, fn in AGGREGATORS.items():
        assert name in headed, f"docs/aggregators.md has no section for {name!r}"
        assert f"::: {fn.__module__}.{fn.__name__}\n" in api, f"no API entry for {name!r}"


def test_readme_is_a_landing_page_whose_links_resolve():
    """README stays short (everything else is on the site) and its links to the pages and
    files of the repository point at files that exist."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    pages = {str(p.relative_to(ROOT)) for p in _pages()} - {"docs/index.md"}
    unlinked = sorted(p for p in pages if p not in local and not p.startswith("docs/api/")
                      and p != "docs/gpu-report.md")
    assert not unlinked, f"README links to no {unlinked}"
