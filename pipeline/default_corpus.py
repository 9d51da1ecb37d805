"""The bundled default corpus: the prose of the Python 3.11 documentation.

Source: the reStructuredText sources that Debian's ``python3.11-doc`` package ships under
``/usr/share/doc/python3.11/html/_sources`` (human-written English, PSF License; see
docs/DEFAULT_CORPUS.md). Each file is split into documents at its first three heading levels;
Sphinx roles are reduced to their text and pure-markup directives are dropped. The output is
JSONL.zst in the Pile's layout (``text`` + ``meta``), written deterministically: same package,
same bytes.

Regenerate with ``make corpus`` (downloads the pinned .deb through apt, no root needed for the
download itself).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path

import zstandard

log = logging.getLogger(__name__)

DEB_VERSION = "3.11.2-6+deb12u9"
SPLIT_LEVELS = 3  # part, section, subsection
SOURCE_DIRS = ("tutorial", "faq", "howto", "reference", "using")

_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`])\1{2,}\s*$")
_ROLE = re.compile(r":[a-zA-Z:]+:`([^`]*)`")
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$")
_MARKUP_DIRECTIVE = re.compile(
    r"^\.\. (index|highlight|module|currentmodule|sectionauthor|moduleauthor|_[^:]*|toctree|"
    r"testsetup|testcleanup|include|only|tabularcolumns|audit-event|raw)\b"
)


def _role_text(match: re.Match) -> str:
    text = match.group(1)
    target = _TARGET.match(text)
    if target and target.group(1):
        text = target.group(1)
    return text.lstrip("~!")


def _clean_lines(lines: list[str]) -> list[str]:
    """Drops markup-only directive blocks (the directive line and its indented body)."""
    out, skipping = [], False
    for line in lines:
        if _MARKUP_DIRECTIVE.match(line):
            skipping = True
            continue
        if skipping and (not line.strip() or line[:1].isspace()):
            continue
        skipping = False
        out.append(_ROLE.sub(_role_text, line))
    return out


def split_rst_sections(source: str) -> list[tuple[str, str]]:
    """Splits an RST document at its SPLIT_LEVELS top heading levels: [(title, text)], in order.

    RST heading levels are defined by the order in which underline styles first appear.
    """
    lines = source.splitlines()
    levels: list[str] = []
    sections: list[tuple[str, list[str]]] = [("", [])]
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        under = _UNDERLINE.match(nxt)
        if line.strip() and under and len(nxt.rstrip()) >= len(line.rstrip()) and not line.startswith(" "):
            style = under.group(1)
            if style not in levels:
                levels.append(style)
            if levels.index(style) < SPLIT_LEVELS:
                sections.append((line.strip(), [line.strip(), ""]))
                i += 2
                continue
        if not _UNDERLINE.match(line):  # overlines of over-and-under titles
            sections[-1][1].append(line)
        i += 1
    out = []
    for title, body in sections:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(_clean_lines(body))).strip()
        if text:
            out.append((title, text))
    return out


def iter_documents(sources_root: Path, *, sections: tuple[str, ...] = SOURCE_DIRS):
    """Yields (relative path, title, text) for every section of the chosen source folders
    (``("",)``: every ``.rst.txt`` of the package)."""
    for sub in sections:
        for path in sorted((sources_root / sub).rglob("*.rst.txt")):
            rel = path.relative_to(sources_root).as_posix()
            for title, text in split_rst_sections(path.read_text(encoding="utf-8")):
                yield rel, title, text


def write_default_corpus(sources_root: Path, out_path: Path, *, sections: tuple[str, ...] = SOURCE_DIRS) -> int:
    """Writes the corpus as JSONL.zst (deterministic: level 19, single thread); returns #docs."""
    buf = io.StringIO()
    n = 0
    for rel, title, text in iter_documents(sources_root, sections=sections):
        meta = {"source": f"python3.11-doc {DEB_VERSION}: {rel}", "title": title}
        buf.write(json.dumps({"text": text, "meta": meta}, ensure_ascii=False, sort_keys=True) + "\n")
        n += 1
    data = buf.getvalue().encode("utf-8")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(zstandard.ZstdCompressor(level=19, threads=0).compress(data))
    log.info("wrote %d documents, %.2f MB of text, to %s", n, len(data) / 1e6, out_path)
    return n


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=Path, required=True, help="the _sources folder of python3.11-doc")
    parser.add_argument("--out", type=Path, default=Path("data/python-docs-3.11.jsonl.zst"))
    parser.add_argument(
        "--all-sections",
        action="store_true",
        help="every section of the package (library, c-api, whatsnew, ...), ~7x the default "
        "corpus: the 10x corpus of bench.scaling",
    )
    args = parser.parse_args()
    write_default_corpus(args.sources, args.out, sections=("",) if args.all_sections else SOURCE_DIRS)


if __name__ == "__main__":
    main()
