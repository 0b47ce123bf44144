"""Progress of long steps on stderr: a bar on a terminal, one plain line per step everywhere else.

Every per-layer loop (calibration and search in ``plan``, GPTQ / SVD / merge passes in ``apply``, ``apply
--stream``, ``export``) reports through ``steps`` so they all read alike. stderr, not stdout: the tables and
``wrote ...`` lines on stdout stay clean for scripts, and a bar never lands inside a table. Off a terminal
(a log file, CI, a pipe) a bar would be one long line of carriage returns, so each finished step is one
line instead, e.g. ``GPTQ: 3 of 32 layers done (41.2 s)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _stream(stream: TextIO | None) -> TextIO:
    # Resolved at call time, not import time: pytest's capture and contextlib.redirect_stderr swap sys.stderr.
    return sys.stderr if stream is None else stream


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def steps(items: Iterable[T], label: str, total: int, *, first: int = 0, unit: str = "layers",
          enabled: bool = True, stream: TextIO | None = None, every: int = 1) -> Iterator[T]:
    """Yield ``items`` and report each one finished: ``label: k of total units done (elapsed)``; ``unit`` plural.

    ``first``: how many of ``total`` were done before (a resumed run starts its count there). ``every``: off a
    terminal, a line every that many steps (and at the last), for loops over hundreds of tensors.
    """
    if not enabled:
        yield from items
        return
    out = _stream(stream)
    if _is_terminal(out):
        bar = tqdm(items, desc=label, unit=f" {unit}", total=total, initial=first, file=out, dynamic_ncols=True)
        try:
            yield from bar
        finally:
            bar.close()
        return
    start = time.perf_counter()
    for done, item in enumerate(items, start=first + 1):
        yield item
        if done % every and done != total:
            continue
        print(f"{label}: {done} of {total} {unit} done ({time.perf_counter() - start:.1f} s)", file=out, flush=True)


def note(message: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One line of progress (a resumed run, a phase starting) where ``steps`` writes, without breaking a bar."""
    if not enabled:
        return
    out = _stream(stream)
    if _is_terminal(out):
        tqdm.write(message, file=out)
    else:
        print(message, file=out, flush=True)
