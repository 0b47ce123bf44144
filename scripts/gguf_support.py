"""Print (or write into README.md) the GGUF export's families and tokenizer kinds, generated from the code.

    python scripts/gguf_support.py                 # the markdown block
    python scripts/gguf_support.py --write-readme  # replace the block in README.md's Export section
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeslim.export.gguf_readme import gguf_support_markdown, replace_block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite the block in README.md")
    args = parser.parse_args(argv)
    block = gguf_support_markdown()
    if args.write_readme:
        path = Path(__file__).resolve().parents[1] / "README.md"
        path.write_text(replace_block(path.read_text(), block))
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
