"""Build the two-domain corpus (Python code vs. English prose) for the demo MoE model.

Everything is rebuilt offline and deterministically from files already on the machine:

* ``code``: modules of the CPython standard library (PSF license), found via
  ``sysconfig.get_path("stdlib")`` of the interpreter running this script.
* ``prose``: running-text paragraphs of the CPython HTML documentation as shipped by the
  Debian package ``python3.11-doc`` (PSF license; ``apt-get install python3-doc``), with
  code blocks removed so that the two domains are clearly different.

Splitting is done per *source file* (a stdlib module or a documentation page) so that no
file leaks across splits. Only the small validation / test / calibration splits are shipped
in the package; the train split goes to ``.scratch/corpus`` (git-ignored).

Usage::

    .venv/bin/python scripts/build_demo_corpus.py
    .venv/bin/python scripts/build_demo_corpus.py --tokenizer src/moeslim/assets/demo-moe
"""

from __future__ import annotations

import argparse
import html.parser
import json
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHIPPED_DIR = REPO / "src" / "moeslim" / "assets" / "corpus"
DEFAULT_TRAIN_DIR = REPO / ".scratch" / "corpus"
DEFAULT_DOCS_HTML = Path("/usr/share/doc/python3.11/html")

SEED = 1234
DOMAINS = ("code", "prose")
SHIPPED_SPLITS = ("validation", "test", "calibration")
SPLITS = ("train", *SHIPPED_SPLITS)
# Byte budget of each shipped split per domain: small enough to keep the package light,
# large enough for stable perplexity / expert-load estimates.
SHIPPED_SPLIT_BYTES = 400_000
# Target size of one document; long files are cut into several documents (same split).
DOC_TARGET_BYTES = 6_000

# Stdlib parts that are tests, vendored wheels, or machine-generated tables: they would
# make the "code" domain less representative of hand-written Python.
SKIP_DIR_NAMES = {"test", "tests", "idle_test", "site-packages", "__pycache__",
                  "encodings", "pydoc_data", "_bundled", "turtledemo"}
SKIP_FILE_BYTES = 150_000
# Documentation pages that are indexes or changelogs rather than running prose.
SKIP_DOC_PARTS = {"genindex", "search.html", "py-modindex.html", "contents.html",
                  "changelog.html", "_sources", "_static", "_downloads", "_images"}
MIN_PARAGRAPH_WORDS = 8


Doc = dict[str, str]


def chunk_python(text: str) -> list[str]:
    """Cut a module into ~DOC_TARGET_BYTES pieces at top-level statement boundaries."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    prev_blank = False
    for line in text.splitlines(keepends=True):
        top_level = bool(line.strip()) and not line[0].isspace()
        if size >= DOC_TARGET_BYTES and top_level and prev_blank:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
        prev_blank = not line.strip()
    if current:
        chunks.append("".join(current))
    return [c.strip("\n") + "\n" for c in chunks if c.strip()]


def chunk_paragraphs(paragraphs: list[str]) -> list[str]:
    """Group paragraphs into ~DOC_TARGET_BYTES documents, never splitting a paragraph."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if size >= DOC_TARGET_BYTES:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def code_files(stdlib: Path) -> list[Path]:
    """Hand-written stdlib modules, sorted for a deterministic order."""
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in SKIP_DIR_NAMES or part.startswith("config-") for part in rel.parts):
            continue
        if rel.name.startswith("test_") or path.stat().st_size > SKIP_FILE_BYTES:
            continue
        files.append(path)
    return files


class ParagraphExtractor(html.parser.HTMLParser):
    """Collect the text of <p> elements that are not inside code blocks or tables.

    Inline ``<code>`` stays (it is part of the sentence); ``<pre>`` blocks and
    highlighted code examples are dropped because they belong to the code domain.
    """

    SKIP_TAGS = {"pre", "script", "style", "table", "nav"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._skip_depth = 0
        self._in_main = False
        self._p_parts: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if attr.get("role") == "main" or "body" in (attr.get("class") or "").split():
            self._in_main = True
        if tag in self.SKIP_TAGS:
            self._skip_depth += 1
        elif tag == "p" and self._skip_depth == 0 and self._in_main:
            self._p_parts = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP_TAGS and self._skip_depth:
            self._skip_depth -= 1
        elif tag == "p" and self._p_parts is not None:
            text = re.sub(r"\s+", " ", "".join(self._p_parts)).strip()
            text = text.replace("\u00b6", "").strip()  # Sphinx permalink markers
            if len(text.split()) >= MIN_PARAGRAPH_WORDS:
                self.paragraphs.append(text)
            self._p_parts = None

    def handle_data(self, data: str) -> None:
        if self._p_parts is not None and self._skip_depth == 0:
            self._p_parts.append(data)


def doc_pages(html_root: Path) -> list[Path]:
    """Documentation pages that hold running prose, sorted for a deterministic order."""
    pages = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root).as_posix()
        if any(part in rel for part in SKIP_DOC_PARTS):
            continue
        pages.append(path)
    return pages


def page_paragraphs(path: Path) -> list[str]:
    parser = ParagraphExtractor()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.paragraphs


def load_code(stdlib: Path) -> list[list[Doc]]:
    """One list of documents per source module."""
    groups = []
    for path in code_files(stdlib):
        source = f"cpython-stdlib/{path.relative_to(stdlib).as_posix()}"
        text = path.read_text(encoding="utf-8", errors="replace")
        groups.append([{"text": c, "source": source} for c in chunk_python(text)])
    return [g for g in groups if g]


def load_prose(html_root: Path) -> list[list[Doc]]:
    """One list of documents per documentation page."""
    groups = []
    for path in doc_pages(html_root):
        source = f"python3.11-doc/html/{path.relative_to(html_root).as_posix()}"
        chunks = chunk_paragraphs(page_paragraphs(path))
        groups.append([{"text": c, "source": source} for c in chunks])
    return [g for g in groups if g]


def split_groups(groups: list[list[Doc]], seed: int) -> dict[str, list[Doc]]:
    """Seeded shuffle of source files, then fill shipped splits to their byte budget."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    splits: dict[str, list[Doc]] = {name: [] for name in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for idx in order:
        group = groups[idx]
        target = next((s for s in SHIPPED_SPLITS if sizes[s] < SHIPPED_SPLIT_BYTES), "train")
        # A single huge page would blow a small split's budget: send it to train instead.
        group_bytes = sum(len(d["text"].encode()) for d in group)
        if target != "train" and group_bytes > SHIPPED_SPLIT_BYTES // 4:
            target = "train"
        splits[target].extend(group)
        sizes[target] += group_bytes
    return splits


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def split_path(domain: str, split: str, shipped_dir: Path, train_dir: Path) -> Path:
    folder = train_dir if split == "train" else shipped_dir
    return folder / f"{domain}.{split}.jsonl"


def iter_docs(path: Path) -> Iterator[Doc]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


SOURCES = [
    ("code", "CPython {pyver} standard library modules (`Lib/**/*.py`, without tests, `encodings`, "
     "`pydoc_data`, `turtledemo`, vendored wheels and files > 150 kB), cut into ~6 kB chunks at "
     "top-level statements", "PSF License Version 2"),
    ("prose", "`<p>` paragraphs of the CPython 3.11 HTML documentation (Debian package `python3.11-doc` "
     "3.11.2), without code blocks, tables, indexes and the changelog; paragraphs >= 8 words, grouped "
     "into ~6 kB documents", "PSF License Version 2 (documentation examples also Zero-Clause BSD)"),
]


def sources_table(pyver: str) -> str:
    rows = ["| domain | source | license |", "|---|---|---|"]
    rows += [f"| `{d}` | {src.format(pyver=pyver)} | {lic} |" for d, src, lic in SOURCES]
    return "\n".join(rows) + "\n"


README_HEAD = """# Demo corpus: Python code vs. English prose

Two clearly different domains used to train and evaluate the embedded demo MoE model
(`moeslim/assets/demo-moe`). Rebuild everything offline and deterministically with
`python scripts/build_demo_corpus.py` (seed {seed}); the train split is written to
`.scratch/corpus/` and is not shipped in the package.

{sources}
Splits are made per source file (a module or a documentation page), so a file never
appears in two splits. Files: `<domain>.<split>.jsonl`, one document per line as
`{{"text": ..., "source": ...}}`.

"""


def readme_table(shipped_dir: Path, train_dir: Path, tokenizer_dir: Path | None) -> str:
    tok = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = ["| domain | split | shipped | documents | bytes | tokens |", "|---|---|---|---|---|---|"]
    for domain in DOMAINS:
        for split in SPLITS:
            docs = list(iter_docs(split_path(domain, split, shipped_dir, train_dir)))
            n_bytes = sum(len(d["text"].encode()) for d in docs)
            n_tok = "n/a"
            if tok is not None:
                n_tok = f"{sum(len(tok(d['text'])['input_ids']) for d in docs):,}"
            shipped = "no" if split == "train" else "yes"
            rows.append(f"| {domain} | {split} | {shipped} | {len(docs):,} | {n_bytes:,} | {n_tok} |")
    note = ("\nTokens are counted with the demo model's byte-level BPE tokenizer.\n"
            if tok is not None else "\n")
    return "\n".join(rows) + "\n" + note


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_path("stdlib")))
    p.add_argument("--docs-html", type=Path, default=DEFAULT_DOCS_HTML)
    p.add_argument("--shipped-dir", type=Path, default=DEFAULT_SHIPPED_DIR)
    p.add_argument("--train-dir", type=Path, default=DEFAULT_TRAIN_DIR)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder; when given, the README also lists token counts")
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not args.docs_html.is_dir():
        sys.exit(f"{args.docs_html} not found: apt-get install python3-doc")
    loaded = {"code": load_code(args.stdlib), "prose": load_prose(args.docs_html)}
    for domain, groups in loaded.items():
        for split, docs in split_groups(groups, args.seed).items():
            write_jsonl(split_path(domain, split, args.shipped_dir, args.train_dir), docs)
    pyver = ".".join(map(str, sys.version_info[:3]))
    readme = README_HEAD.format(seed=args.seed, sources=sources_table(pyver))
    readme += readme_table(args.shipped_dir, args.train_dir, args.tokenizer)
    (args.shipped_dir / "README.md").write_text(readme, encoding="utf-8")
    print(readme)


if __name__ == "__main__":
    main()
