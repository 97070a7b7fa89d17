"""``async with ClientSecretCredential(...)``: the README's form; the credential is closed on the way out."""

from __future__ import annotations

import pytest

from anonjoin import AuthError, Client
from anonjoin.simulator import Simulator

from support.simulator import sim_credential


async def test_async_with_gives_the_credential_and_closes_it(sim: Simulator) -> None:
    made = sim_credential(sim)
    async with made as credential:
        assert credential is made
        assert (await credential.token()).value
    with pytest.raises(AuthError, match="closed"):
        await credential.token()


async def test_the_readme_embedding_example_joins_and_leaves(sim: Simulator) -> None:
    i = sim.info
    async with (
        sim_credential(sim) as credential,
        Client(
            discover_url=i.discover_url, endpoint_id=i.endpoint_id, credential=credential, ca_file=i.ca_file
        ) as client,
    ):
        guest = client.guest(meeting_url=i.meeting_url, origin=i.origin, display_name="Ada")
        result = await guest.join()
        assert result.duration_s > 0
        await guest.leave()
    with pytest.raises(AuthError, match="closed"):
        await credential.token()
    assert sim.snapshot()["applications"]["live"] == 0
