"""MkDocs hooks of the documentation site (mkdocs.yml names this file).

* Math: pymdownx.arithmatex (generic mode) marks ``$...$`` and ``$$...$$``; here each is
  turned into MathML with latex2mathml at build time, so the pages show their equations in
  any current browser with no script and no request outside the site.
* Docstrings written with Sphinx roles (``:func:`x```) render in mkdocstrings as the role's
  text before a code span; the role is dropped (and a leading ``~`` shortens the name).
* The recorded benchmark and training plots (``bench/results/*.png``,
  ``python/results/*.png``) are served from where the programs write them, as
  ``results/bench/NAME.png`` and ``results/python/NAME.png``: no copies under docs/.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from latex2mathml.converter import convert
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"bench": ROOT / "bench" / "results", "python": ROOT / "python" / "results"}

_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
_ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|obj|exc):<code>(~?)([^<]+)</code>")


class MathError(ValueError):
    pass


def _mathml(tex: str, display: str, where: str) -> str:
    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as err:  # a formula latex2mathml cannot read fails the build
        raise MathError(f"{where}: cannot convert the formula {tex!r}: {err}") from err


def _role(m: re.Match) -> str:
    name = m.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if m.group(1) else name}</code>"


def on_page_content(html_text: str, page, config, files) -> str:
    where = page.file.src_uri
    html_text = _BLOCK.sub(lambda m: _mathml(m.group(1), "block", where), html_text)
    html_text = _INLINE.sub(lambda m: _mathml(m.group(1), "inline", where), html_text)
    return _ROLE.sub(_role, html_text)


def on_files(files: Files, config) -> Files:
    for kind, folder in RESULTS.items():
        for png in sorted(folder.glob("*.png")):
            files.append(File.generated(config, f"results/{kind}/{png.name}",
                                        abs_src_path=str(png)))
    return files
