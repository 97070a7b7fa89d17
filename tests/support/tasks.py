"""The library's own asyncio tasks (named ``anonjoin-*``), to check that none is left running."""

from __future__ import annotations

import asyncio


def our_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("anonjoin-") and not t.done()]
