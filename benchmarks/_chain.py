"""What every client of the benchmarks shares: the target, link lookup, the chain's error. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

JSON = dict[str, Any]
_PREFIXES = ("service:", "ms:rtc:saas:")


class ChainError(RuntimeError):
    """The server did not serve the chain as protocol.md says (status, missing link, failed invitation)."""


def link(body: JSON, rel: str, base: str) -> str:
    """The absolute href of relation ``rel`` (any documented prefix) in ``body['_links']``."""
    links = body.get("_links", {})
    for prefix in ("", *_PREFIXES):
        entry = links.get(prefix + rel)
        if entry is not None:
            return urljoin(base, str(entry["href"]))
    raise ChainError(f"no {rel!r} link (have {sorted(links)})")


@dataclass
class Target:
    """Where and who: the simulator's JSON line (SimulatorInfo) carries every field."""

    discover_url: str
    authority: str
    client_id: str
    client_secret: str
    scope: str
    endpoint_id: str
    meeting_url: str
    origin: str
    ca_file: str | None

    @classmethod
    def from_info(cls, info: JSON) -> Target:
        return cls(**{k: info[k] for k in cls.__dataclass_fields__})
