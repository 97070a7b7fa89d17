"""Helpers shared by the test tiers (``tests/core``, ``tests/steps``, ``tests/e2e``); no test lives here.

``policies`` (fast retry / rejoin policies), ``simulator`` (clients, credentials and a threaded simulator
for the simulator under test), ``processes`` (the repository root, a clean environment for subprocesses),
``fake`` (a scripted fake service for single-step tests), ``walk`` (raw requests against the simulator),
``redis_server``, ``hostile``, ``observe`` and ``ray_cluster``. A test module imports from here, never
from another test module.
"""
