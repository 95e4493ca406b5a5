"""JAX decoder vs transformers' eager model on this CPU, side by side in one run.

The qwen2.5-0.5b config (random weights), 512 tokens, bfloat16 and float32. Each side
runs in its own subprocess (so peak RSS is that side's alone): one warm-up call (the
JAX compile), then ``--repeats`` timed calls; the median is reported, and the ratio
of medians taken in this same run. Results: benchmarks/results/model_cpu.json.

    .venv/bin/python benchmarks/model_cpu.py [--tokens 512] [--repeats 5] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "model_cpu.json"


def _side(side: str, dtype: str, tokens: int, repeats: int, layers: int | None) -> dict:
    import numpy as np
    import torch

    from oracles.arrays import torch_to_numpy
    from oracles.diverge import hf_model, preset

    torch.set_num_threads(os.cpu_count() or 1)
    cfg_dict = preset("qwen2.5-0.5b", layers=layers)
    model = hf_model(cfg_dict, dtype=dtype, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg_dict["vocab_size"], (1, tokens))
    times = []
    if side == "hf":
        x = torch.from_numpy(ids)
        with torch.no_grad():
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                model(x).logits.float().sum().item()  # forces the whole forward
                if i:
                    times.append(time.perf_counter() - t0)
    else:
        import jax
        import jax.numpy as jnp

        from kernels.models import qwen2 as M
        from oracles.jaxsetup import configure_jax

        configure_jax()
        cfg = M.Config.from_hf(cfg_dict)
        params = M.params_from_hf({k: torch_to_numpy(v) for k, v in model.state_dict().items()}, cfg, jnp.dtype(dtype))
        del model  # the JAX side holds its own copy of the weights, not torch's too
        x = jnp.asarray(ids)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            jax.block_until_ready(M.forward(params, x, config=cfg))
            if i:
                times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(_side(a.side, a.dtype, a.tokens, a.repeats, a.layers)))
        return
    out = {"config": "qwen2.5-0.5b (random weights)", "tokens": a.tokens, "repeats": a.repeats, "layers": a.layers,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "runs": {}}
    for dtype in ("bfloat16", "float32"):
        row = {}
        for side in ("hf", "jax"):
            cmd = [sys.executable, __file__, "--side", side, "--dtype", dtype, "--tokens", str(a.tokens),
                   "--repeats", str(a.repeats)] + (["--layers", str(a.layers)] if a.layers else [])
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[side] = json.loads(res.stdout.strip().splitlines()[-1])
        row["jax_speedup_vs_hf"] = row["hf"]["median_s"] / row["jax"]["median_s"]
        row["jax_rss_vs_hf"] = row["jax"]["peak_rss_mib"] / row["hf"]["peak_rss_mib"]
        out["runs"][dtype] = row
        print(f"{dtype}: HF eager {row['hf']['median_s']:.3f} s ({row['hf']['peak_rss_mib']:.0f} MiB peak), "
              f"JAX {row['jax']['median_s']:.3f} s ({row['jax']['peak_rss_mib']:.0f} MiB peak): "
              f"JAX x{row['jax_speedup_vs_hf']:.2f} the speed of HF")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
