"""What subprocess tests share: the repository root and an environment without ``ANONJOIN_*`` settings."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def clean_env() -> dict[str, str]:
    """This process's environment without any ``ANONJOIN_*`` setting (so none leaks into a child)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
