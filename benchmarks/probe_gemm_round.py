"""Can a bf16/f16 matmul round in the GEMM's epilogue and keep the float32-sum-then-round bits?

    python3 benchmarks/probe_gemm_round.py --out $OUT/probe_gemm_round_h100.json

XLA does not fold the convert of a float32-output GEMM into the GEMM (on an H100 the 7B
lm_head with bf16 logits: a 5.93 ms GEMM writing float32, then a 1.21 ms convert). The
shipped recipe (``kernels._dot``: ``dot_f32`` then one rounding) is the reference here;
for each shape and dtype the script compares with it, element by element:

* ``out``: ``dot_general(preferred_element_type=dt, precision=HIGHEST)``;
* ``algo``: the same with ``precision=DotAlgorithmPreset.{BF16_BF16_F32, F16_F16_F32}``,
  which names a float32 accumulation explicitly.

It reports the fraction of bit-identical outputs, the largest difference in ulps of dt,
the ops XLA compiled (a cuBLAS call or a fusion) and, for the large shapes, the device
time of each (CUPTI spans, ``devtime``). ``--smoke`` runs the comparison on any backend,
small shapes only, no timing.

Result (H100, 2026-11-22, results/probe_gemm_round_h100.json): at 4096 rows (the 7B
gate_proj and lm_head) ``out`` is bit-identical and 20-25% faster (713 against 908 us;
5.59 against 7.02 ms). Elsewhere it is not the same function: XLA compiles small or
thin bf16/f16-output dots to paths that do not keep a float32 sum. One row of a K = 18944
projection: 56% of outputs identical, up to 368 ulps off; a 1 x 64 x 64 product: 59%,
22 ulps; 64 rows in f16: 148 ulps. ``algo`` fixes the one-row bf16 case (0.57 ulps) but
not the others, and XLA's GPU backend refuses F16_F16_F32. The GPU suite agreed: with
the fused form in linear, lm_head and swiglu, 8 projection / swiglu budget tests failed
(f16 linear at 15x the oracle's error). So the kernels keep the float32 GEMM and the
separate rounding, whose bits do not depend on XLA's choice of path.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch = None
    if not args.smoke:
        import torch
        from devtime import device_span

    f32 = jnp.float32
    dims = (((1,), (0,)), ((), ()))
    presets = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}
    variants = {
        "ref": lambda x, w: jax.lax.dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST,
                                                preferred_element_type=f32).astype(x.dtype),
        "out": lambda x, w: jax.lax.dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST,
                                                preferred_element_type=x.dtype),
        "algo": lambda x, w: jax.lax.dot_general(x, w, dims, precision=presets[x.dtype],
                                                 preferred_element_type=x.dtype),
    }
    # (rows, K, N): a decode step's projections, a prefill's, the 7B lm_head; the fuzzed
    # tests' small shapes first.
    shapes = [(1, 64, 64), (3, 64, 1000), (8, 896, 4864), (64, 896, 4864), (1, 18944, 3584),
              (4096, 3584, 18944), (4096, 3584, 152064)]
    if args.smoke:
        shapes = shapes[:3]
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": []}
    key = jax.random.PRNGKey(0)
    for rows, k, n in shapes:
        for dt in (jnp.bfloat16, jnp.float16):
            kx, kw = jax.random.split(jax.random.fold_in(key, rows * 7 + k))
            x = jax.random.normal(kx, (rows, k), f32).astype(dt)
            w = (jax.random.normal(kw, (k, n), f32) * k ** -0.5).astype(dt)
            outs, row = {}, {"shape": [rows, k, n], "dtype": jnp.dtype(dt).name}
            for name, fn in variants.items():
                try:
                    g = jax.jit(fn)
                    hlo = g.lower(x, w).compile().as_text()
                    ent = hlo[hlo.index("ENTRY"):]
                    row[f"{name}_ops"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', ent))
                                                | set(re.findall(r"kind=k(\w+)", ent)))
                    outs[name] = np.asarray(g(x, w).astype(f32))
                    if torch is not None and rows * n >= 1 << 24:
                        d = device_span(torch, lambda i: g(x, w), jax.block_until_ready, 1, calls=5)
                        row[f"{name}_us"] = d.get("span_s", float("nan")) * 1e6
                except Exception as e:  # noqa: BLE001 - a refused variant is a result
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            ref = outs["ref"]
            ulp = np.abs(ref) * (2.0 ** -7 if dt == jnp.bfloat16 else 2.0 ** -10)  # ~1 ulp at |ref|
            ulp = np.maximum(ulp, 1e-30)
            for name in ("out", "algo"):
                if name in outs:
                    row[f"{name}_identical"] = float(np.mean(outs[name] == ref))
                    row[f"{name}_max_ulps"] = float(np.max(np.abs(outs[name] - ref) / ulp))
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
