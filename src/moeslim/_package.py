"""The package's version and the folder of its bundled assets (the demo models and corpus splits).

Kept apart from ``moeslim/__init__`` so that low layers can read them without importing the public API.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def assets_dir() -> Path:
    """The ``assets`` folder shipped inside the installed package."""
    return Path(__file__).parent / "assets"
