"""Every (state, input) pair of the guest machine against an expectation written out here by hand, row by
row, from protocol.md (not derived from ``TRANSITIONS``): a changed table fails this test."""

from __future__ import annotations

import pytest

from anonjoin._core.protocol import TERMINAL, TRANSITIONS, GuestMachine, GuestState, Input
from anonjoin._exceptions import ProtocolError

S, I = GuestState, Input  # noqa: E741 - short names keep the rows readable

# What every live state shares: the meeting's end, the caller's leave, a final error.
_END = {I.ENDED: S.ENDED, I.LEAVE: S.LEAVING, I.FAIL: S.FAILED}

EXPECTED: dict[GuestState, dict[Input, GuestState]] = {
    S.NEW: {I.JOIN: S.MINTING, I.LEAVE: S.LEAVING, I.FAIL: S.FAILED},
    S.MINTING: {I.GRANTED: S.DISCOVERING, I.DECLINED: S.FAILED, I.RETRY_REJOIN: S.REJOINING, **_END},
    S.REJOINING: {I.GRANTED: S.DISCOVERING, I.DECLINED: S.FAILED, I.RETRY_REJOIN: S.REJOINING, **_END},
    S.DISCOVERING: {
        I.DISCOVERED: S.CREATING, I.DECLINED: S.FAILED, I.EXPIRING: S.REJOINING, I.RETRY_REJOIN: S.REJOINING,
        **_END,
    },
    S.CREATING: {
        I.CREATED: S.INVITING, I.DECLINED: S.FAILED, I.EXPIRING: S.REJOINING, I.APP_GONE: S.CREATING,
        I.RETRY_REJOIN: S.REJOINING, **_END,
    },
    S.INVITING: {
        I.INVITED: S.CONNECTING, I.DECLINED: S.FAILED, I.EXPIRING: S.REJOINING, I.APP_GONE: S.CREATING,
        I.RETRY_REJOIN: S.REJOINING, **_END,
    },
    S.CONNECTING: {
        I.PROGRESS: S.CONNECTING, I.IN_LOBBY: S.LOBBY, I.SUCCEEDED: S.JOINED, I.DECLINED: S.FAILED,
        I.DROPPED: S.REJOINING, I.EXPIRING: S.REJOINING, I.APP_GONE: S.CREATING, I.RETRY_REJOIN: S.REJOINING,
        I.REPLACED: S.LEFT, **_END,
    },
    S.LOBBY: {
        I.PROGRESS: S.LOBBY, I.IN_LOBBY: S.LOBBY, I.LOBBY_TIMEOUT: S.FAILED, I.SUCCEEDED: S.JOINED,
        I.DECLINED: S.FAILED, I.DROPPED: S.REJOINING, I.EXPIRING: S.REJOINING, I.APP_GONE: S.CREATING,
        I.RETRY_REJOIN: S.REJOINING, I.REPLACED: S.LEFT, **_END,
    },
    S.JOINED: {  # no RETRY_REJOIN: a joined guest's failures are drops, expiry or a gone application
        I.PROGRESS: S.JOINED, I.IN_LOBBY: S.JOINED, I.DROPPED: S.REJOINING, I.EXPIRING: S.REJOINING,
        I.APP_GONE: S.CREATING, I.REPLACED: S.LEFT, **_END,
    },
    S.LEAVING: {I.DELETED: S.LEFT, I.LEAVE: S.LEAVING, I.FAIL: S.FAILED},
    S.LEFT: {},
    S.ENDED: {},
    S.FAILED: {},
}  # fmt: skip

ALL_PAIRS = [(s, i) for s in GuestState for i in Input]


def test_the_expectation_covers_every_state() -> None:
    assert set(EXPECTED) == set(GuestState)


@pytest.mark.parametrize(("state", "inp"), ALL_PAIRS, ids=[f"{s.value}-{i.value}" for s, i in ALL_PAIRS])
def test_every_pair(state: GuestState, inp: Input) -> None:
    want = EXPECTED[state].get(inp)
    assert TRANSITIONS.get((state, inp)) is want
    m = GuestMachine()
    m.state = state
    if want is not None:
        assert m.handle(inp) is want
        assert m.state is want
        return
    with pytest.raises(ProtocolError):
        m.handle(inp)
    if state in TERMINAL:
        assert m.state is state  # a terminal state keeps its outcome
    else:
        assert (m.state, m.reason) == (GuestState.FAILED, "ProtocolError")
