"""The anonjoin simulator: a faithful local Azure AD + Trusted Application API + UCWA psanon service.

``async with Simulator(SimulatorConfig(seed=1, faults="none")) as sim: sim.info ...`` starts it in-process
on two ephemeral loopback TLS listeners (main and pool); ``anonjoin simulate`` runs it from the command
line. protocol.md §3-§8 is the contract. The modules, from the wire inwards::

    _server.py    Simulator: listeners, TLS files, lifecycle, in-process admin actions
    _process.py   SimulatorProcess: the simulator as child process(es), stopped by PID, never orphaned
    _pools.py     --pools N: the front door, its pool processes, the merged admin view, the lifeline
    _app.py       the route table and the one dispatcher (faults, 307s, counting, timelines)
    _aad.py       Azure AD: OpenID configuration, keys, client-credentials token endpoint
    _tap.py       Trusted Application API: discover, applications, capabilities, tokens, adhocMeetings
    _ucwa.py      UCWA psanon: anonymous discover, applications, invitations, events, DELETE
    _admin.py     /_admin: state snapshot and actions
    _meetings.py  meetings, applications, the join state machine and its events
    _events.py    one application's event channel (ack/next, parking, priorities, idle expiry)
    _core.py      Core (everything one simulator knows) and Call (one request)
    _wire.py      error bodies, dates, relation prefixes, hrefs, JSON bodies
    _tokens.py    RS256 signing keys and cached verification
    _tls.py       the process-wide CA and certificates
    _config.py    SimulatorConfig (every knob) and SimulatorInfo (how to reach it)
    _faults.py    fault profiles and the seeded injector
    _cli.py       ``anonjoin simulate``

The names below are imported on first use (PEP 562): the CLI registers ``simulate`` without loading
the server.
"""

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anonjoin.simulator._config import SimulatorConfig, SimulatorInfo
    from anonjoin.simulator._faults import FaultInjector, FaultProfile, FaultRule
    from anonjoin.simulator._process import SimulatorProcess
    from anonjoin.simulator._server import Simulator

__all__ = [
    "FaultInjector",
    "FaultProfile",
    "FaultRule",
    "Simulator",
    "SimulatorConfig",
    "SimulatorInfo",
    "SimulatorProcess",
]

_LAZY: dict[str, str] = {
    "FaultInjector": "anonjoin.simulator._faults",
    "FaultProfile": "anonjoin.simulator._faults",
    "FaultRule": "anonjoin.simulator._faults",
    "Simulator": "anonjoin.simulator._server",
    "SimulatorConfig": "anonjoin.simulator._config",
    "SimulatorInfo": "anonjoin.simulator._config",
    "SimulatorProcess": "anonjoin.simulator._process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anonjoin.simulator' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
