"""``python -m benchmarks._pinned CPU MODULE [ARGS...]``: pin this process to one core, then run MODULE.

Pinning before the module starts means every thread it creates later inherits the affinity (setting the
affinity of a running process from outside moves only its main thread).
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m benchmarks._pinned CPU MODULE [ARGS...]")
    cpu, module = int(sys.argv[1]), sys.argv[2]
    os.sched_setaffinity(0, {cpu})
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
