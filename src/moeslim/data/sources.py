"""Where text comes from: the bundled offline corpus, local files, or Hugging Face datasets.

Every source resolves to a tuple of documents plus a content hash, so a plan can record exactly
which text it was computed on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moeslim._package import assets_dir
from moeslim.hub import hub_reachable

SPLITS = ("calibration", "validation", "test")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataSourceError(ValueError):
    """A data source spec that cannot be read; the message says what to change."""


@dataclass(frozen=True)
class TextSource:
    """A named collection of documents with a hash of their content."""

    name: str
    documents: tuple[str, ...]
    content_hash: str

    @classmethod
    def from_documents(cls, name: str, documents: list[str] | tuple[str, ...]) -> TextSource:
        docs = tuple(d for d in documents if d.strip())
        if not docs:
            raise DataSourceError(f"data source {name!r} has no non-empty documents")
        digest = hashlib.sha256()
        for doc in docs:
            digest.update(doc.encode("utf-8"))
            digest.update(b"\0")
        return cls(name=name, documents=docs, content_hash=digest.hexdigest()[:16])


def bundled_corpus_dir() -> Path:
    return assets_dir() / "corpus"


def bundled_domains() -> list[str]:
    corpus = bundled_corpus_dir()
    return sorted({p.name.split(".")[0] for p in corpus.glob("*.*.jsonl")})


def load_source(spec: str, split: str | None = None, text_field: str = "text") -> TextSource:
    """Resolve a source spec.

    Specs: ``demo:DOMAIN[:SPLIT]`` (bundled corpus; split defaults to ``split`` or "calibration"),
    a local ``.txt`` / ``.jsonl`` / ``.parquet`` path, or ``hf:NAME[:CONFIG][:SPLIT]`` (online only).
    """
    if spec.startswith("demo:"):
        return _load_bundled(spec, split)
    if spec.startswith("hf:"):
        return _load_hf(spec, text_field)
    path = Path(spec)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataSourceError(f"data file {spec!r} does not exist")
        return TextSource.from_documents(str(path), _read_local(path, text_field))
    raise DataSourceError(
        f"cannot read data source {spec!r}: use demo:DOMAIN[:SPLIT] (domains: "
        f"{', '.join(bundled_domains()) or 'none bundled'}), a .txt/.jsonl/.parquet file, "
        "or hf:NAME[:CONFIG][:SPLIT]"
    )


def _load_bundled(spec: str, split: str | None) -> TextSource:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise DataSourceError(f"bundled source {spec!r} must look like demo:DOMAIN or demo:DOMAIN:SPLIT")
    domain = parts[1]
    chosen = parts[2] if len(parts) == 3 else (split or "calibration")
    if chosen not in SPLITS:
        raise DataSourceError(f"split {chosen!r} of {spec!r} is not one of {', '.join(SPLITS)}")
    path = bundled_corpus_dir() / f"{domain}.{chosen}.jsonl"
    if not path.is_file():
        raise DataSourceError(
            f"bundled domain {domain!r} has no {chosen} split; bundled domains: "
            f"{', '.join(bundled_domains()) or 'none'}"
        )
    return TextSource.from_documents(f"demo:{domain}:{chosen}", _read_jsonl(path, "text"))


def _read_local(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        # Blank-line separated paragraphs would fragment code; a .txt file is one document.
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            raise DataSourceError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return _read_parquet(path, text_field)


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataSourceError(f"{path}:{line_no} is not UTF-8 text ({err.reason} at byte {err.start} of the "
                                      'line); a .jsonl file holds one {"' + text_field + '": ...} object per line'
                                      ) from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{path}:{line_no} is not valid JSON ({err.msg}); a .jsonl file holds one "
                                      f'{{"{text_field}": ...}} object per line') from err
            if not isinstance(record, dict):
                raise DataSourceError(f"{path}:{line_no} is a JSON {type(record).__name__}, not an object; a .jsonl "
                                      f'file holds one {{"{text_field}": ...}} object per line')
            if text_field not in record:
                raise DataSourceError(
                    f"{path}:{line_no} has no {text_field!r} field (fields: {', '.join(record)}); "
                    "pass the right text field"
                )
            docs.append(str(record[text_field]))
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise DataSourceError(
            f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)})"
        )
    return [str(v) for v in table.column(text_field).to_pylist()]


def _load_hf(spec: str, text_field: str) -> TextSource:
    parts = spec.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 3:
        raise DataSourceError(f"hub source {spec!r} must look like hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    if not hub_reachable():
        raise DataSourceError(
            f"{spec!r} needs the Hugging Face Hub, which this machine cannot reach; "
            "use a bundled source (demo:code, demo:prose) or a local file"
        )
    try:
        import datasets
    except ImportError as err:
        raise DataSourceError(f"{spec!r} needs the 'datasets' package: pip install 'moeslim[hf]'") from err
    dataset = datasets.load_dataset(name, config, split=split)
    if text_field not in dataset.column_names:
        raise DataSourceError(f"{spec!r} has no column {text_field!r} (columns: {dataset.column_names})")
    return TextSource.from_documents(spec, [str(t) for t in dataset[text_field]])
