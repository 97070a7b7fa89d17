"""Helpers shared by the test tiers (``tests/core``, ``tests/steps``, ``tests/e2e``); no test lives here.

``policies`` (fast retry / rejoin policies), ``faults`` (shared fault profiles), ``simulator`` (a credential
and a ``Client`` for a running simulator, a simulator in a thread, snapshot readers), ``processes`` (the
repository root, an environment without ``ANONJOIN_*`` for subprocesses), ``tasks`` (the library's live
tasks), ``fake`` (a scripted fake service for single-step tests), ``walk`` (raw requests against the
simulator), ``redis_server``, ``hostile``, ``observe`` and ``ray_cluster``. A test module imports from
here, never from another test module. ``tests/`` is on ``sys.path`` (pytest puts it there for
``tests/conftest.py``), so this package is imported as ``support``.
"""
