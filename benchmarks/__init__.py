"""anonjoin's benchmarks: ratios against baselines measured in the same run (``python -m benchmarks``).

Run from the repository root (the package is not installed with anonjoin)::

    python -m benchmarks                       # everything, full sizes (a few minutes on 2 cores)
    python -m benchmarks --quick               # small sizes, 2 repeats (about a minute and a half)
    python -m benchmarks --out r.json --markdown section.md   # JSON report + the RESULTS.md section
    python -m benchmarks --only overhead --profile aj.pstats  # also profile one extra anonjoin run

Locust (the peer) is optional: ``pip install 'anonjoin[bench]'``; without it that row is skipped with a
note. Nothing here is a timed test: ``tests/e2e/test_benchmarks_smoke.py`` runs the code at tiny sizes
(``--smoke``) so it cannot rot.

Modules:

* ``__main__``: the command line, the targets of issue 5, the table, the JSON and Markdown output.
* ``_scenarios``: overhead (raw / anonjoin's runner / anonjoin's Client / Locust), growth and held
  guests, simulator capacity.
* ``_harness``: the simulator process, worker processes, ``/proc`` readings, statistics.
* ``_worker``, ``_drive``: one client run in its own process (asyncio clients), ``_locust`` (gevent).
* ``_raw``, ``_chain``: the raw aiohttp baseline; ``_pinned``: start a module pinned to one core.
"""
