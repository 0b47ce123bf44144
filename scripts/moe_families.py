"""Print the MoE families of the installed transformers and what moeslim does with each.

    python scripts/moe_families.py             # a plain table
    python scripts/moe_families.py --markdown > src/moeslim/models/README.md

Re-run it when transformers moves: new MoE folders show up as "unclassified". The rows come from
``moeslim.models.catalog.discover`` (structural: the transformers models/ tree), the facts from the family table.
"""

from __future__ import annotations

import argparse
import sys

from moeslim.models.catalog import FamilyRow, discover
from moeslim.models.readme import markdown


def plain(rows: list[FamilyRow]) -> str:
    header = ("family", "config class", "causal-LM class", "router", "shared experts", "layout", "status")
    table = [header] + [(r.model_type, r.config_class, r.causal_lm or "-", r.router, r.shared, r.layout, r.status)
                        for r in rows]
    widths = [min(40, max(len(row[i]) for row in table)) for i in range(len(header) - 1)]
    lines = ["  ".join(cell[:w].ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in table]
    supported = sum(r.supported for r in rows)
    return "\n".join(lines) + f"\n\n{supported} supported of {len(rows)} MoE model types\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="the README of moeslim.models (markdown)")
    args = parser.parse_args(argv)
    rows = discover()
    sys.stdout.write(markdown(rows) if args.markdown else plain(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
