"""How fast the property suite runs on this machine (a benchmark, not a timed test).

1. Wall time of the README's test command (``pytest -n 2``, ``ci`` profile), once with an
   empty JAX compilation cache (a fresh clone) and once warm (the persistent cache filled).
2. Steady-state hypothesis examples per second per op once compiled: the same seeded
   sweep twice in one process; the second pass (every shape already compiled) is timed.

    .venv/bin/python benchmarks/suite_cpu.py [--examples 60] [--skip-suite]

Results: benchmarks/results/suite_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "suite_cpu.json"


def suite_wall(cache_dir: Path) -> tuple[float, str]:
    env = dict(os.environ, PARITY_JAX_CACHE=str(cache_dir))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, (p.stdout.strip().splitlines() or ["?"])[-1]


def examples_per_second(examples: int) -> dict:
    from oracles import budgets, registry
    from oracles.jaxsetup import configure_jax
    from oracles.strategies import DTYPES
    from oracles.sweep import sweep

    configure_jax()
    tol = budgets.load()
    out = {}
    for op in registry.OP_NAMES:
        n = 0
        for dt in DTYPES:
            sweep(op, dt, examples=examples, seed=0, tolerances=tol)  # compiles every shape it meets
        t0 = time.perf_counter()
        for dt in DTYPES:
            rows = sweep(op, dt, examples=examples, seed=0, tolerances=tol)  # same cases: all compiled
            n += sum(r.examples for r in rows.values())
        secs = time.perf_counter() - t0
        out[op] = {"examples": n, "seconds": secs, "examples_per_s": n / secs}
        print(f"{op}: {n / secs:.1f} examples/s ({n} examples in {secs:.1f} s, compiled)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=60)
    p.add_argument("--skip-suite", action="store_true")
    a = p.parse_args()
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    if not a.skip_suite:
        cache = Path(tempfile.mkdtemp(prefix="jaxcache-"))
        try:
            cold, cold_line = suite_wall(cache)
            warm, warm_line = suite_wall(cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        res["suite"] = {"command": "python -m pytest -n 2 (ci profile)", "cold_cache_s": cold, "cold_result": cold_line,
                        "warm_cache_s": warm, "warm_result": warm_line}
        print(f"suite: {cold:.0f} s with an empty compilation cache ({cold_line}), {warm:.0f} s warm ({warm_line})")
    res["steady_state"] = examples_per_second(a.examples)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
