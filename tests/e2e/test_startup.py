"""What ``anonjoin join --help`` and ``import anonjoin`` load (issue 15: a faster start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("aiohttp", "msal", "hdrh", "rich", "pydantic_settings", "prometheus_client", "anonjoin._load.runner",
         "anonjoin._load.report_html", "anonjoin._async.client", "anonjoin.simulator._server")  # fmt: skip

PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {{"aiohttp", "msal", "hdrh", "rich",
      "pydantic_settings", "prometheus_client", "anonjoin"}})))
"""


def _loaded(body: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(body=body)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("command", ["join", "load", "simulate", "sessions", "rejoin", "doctor"])
def test_help_loads_nothing_heavy(command: str) -> None:
    body = (
        "import contextlib, io\n"
        "from anonjoin._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main([{command!r}, '--help'])\n"
        "    except SystemExit:\n"
        "        pass"
    )
    loaded = _loaded(body)
    assert "anonjoin._cli.join" in loaded  # the probe sees the modules it should
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY] == []


def test_import_anonjoin_is_lazy_and_the_names_still_resolve() -> None:
    assert [m for m in _loaded("import anonjoin") if m in HEAVY or m.split(".")[0] in HEAVY] == []
    loaded = _loaded("import anonjoin\nanonjoin.Client\nfrom anonjoin import run_load")
    assert "anonjoin._async.client" in loaded and "anonjoin._load.runner" in loaded
    import anonjoin

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        anonjoin.Nope  # noqa: B018
    assert set(anonjoin.__all__) <= set(dir(anonjoin))
