"""The README's embedding example runs as written against the simulator."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from anonjoin.simulator import Simulator

from support.processes import README


def _embedding_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Embedding") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Embedding section has no python example"
    return match.group(1)


async def test_readme_embedding_example_joins_and_leaves(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    info = sim.info
    code = _embedding_example().replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {
        "AUTHORITY": info.authority,
        "CLIENT_ID": info.client_id,
        "SECRET": info.client_secret,
        "SCOPE": info.scope,
        "CA_FILE": info.ca_file,
        "DISCOVER_URL": info.discover_url,
        "ENDPOINT_ID": info.endpoint_id,
        "MEETING_URL": info.meeting_url,
        "ORIGIN": info.origin,
    }
    exec(compile(code, "README.md", "exec"), namespace)
    await asyncio.wait_for(namespace["main"](), timeout=30)
    out = capsys.readouterr().out
    assert "joined in" in out
    assert "not joined" not in out
    assert sim.snapshot()["applications"]["live"] == 0
