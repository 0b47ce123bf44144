"""Keep what third-party libraries print while they evaluate out of moeslim's console output.

lm-eval (and the ``datasets`` it drives) draws its own progress bars and logs warnings that say nothing to a
moeslim user (``pretrained`` model kwarg is not of type ``str``, "Passed an already-initialized model"), and
they land between our progress lines and tables. While the harness runs, its Python-level stderr (tqdm bars,
logging's last-resort handler) and the records of the libraries' loggers go to ``log`` (a run folder's log
file) or nowhere. Only that call is redirected: moeslim prints nothing while it runs, and our own progress and
tables before and after go to the real stderr/stdout. (The ``git`` child process lm-eval starts for its
version stamp is avoided at the source: see ``tasks._lm_eval_score``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TextIO

THIRD_PARTY_LOGGERS = ("lm_eval", "datasets", "transformers", "evaluate", "huggingface_hub")


@contextlib.contextmanager
def third_party_output(log: TextIO | None = None) -> Iterator[None]:
    """Send what the libraries print inside the block to ``log`` (None: discard); restore everything after."""
    with contextlib.ExitStack() as stack:
        sink = log if log is not None else stack.enter_context(open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        saved = []
        for name in THIRD_PARTY_LOGGERS:
            logger = logging.getLogger(name)
            saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers = [handler]  # (transformers' own handler holds the real stderr: replace, not add)
            logger.propagate = False
        try:
            with contextlib.redirect_stderr(sink):
                yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers = handlers
                logger.propagate = propagate
            handler.flush()
