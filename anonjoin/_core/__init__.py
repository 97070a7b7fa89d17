"""The sans-IO core: every protocol decision of a guest, and nothing that waits.

Modules here import no I/O library (no asyncio, aiohttp, msal, tenacity, ssl, socket, sqlite3, hdrh;
tests/steps/test_import_graph.py checks it). They are fed what happened (a parsed response, an error, a timer
that fired, the caller's join or leave) with the time as an argument, monotonic seconds, and answer with
what to do: send this request, mint this psat, wait until then, emit this event, done. A driver performs
the answers: ``anonjoin._async.guest`` with asyncio and aiohttp; another (a load tool's own HTTP client)
can reuse them unchanged.

- :mod:`anonjoin._core.policy`: the frozen retry and rejoin policies, and a join's step bookkeeping.
- :mod:`anonjoin._core.conversation`: one guest's conversation with the service.
"""
