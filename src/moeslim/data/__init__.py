"""Text sources -> fixed-length token samples, each source with a content hash."""

from moeslim.data.sources import (
    DataSourceError,
    TextSource,
    bundled_corpus_dir,
    load_source,
)
from moeslim.data.windows import token_stream, token_windows

__all__ = [
    "DataSourceError",
    "TextSource",
    "bundled_corpus_dir",
    "load_source",
    "token_stream",
    "token_windows",
]
