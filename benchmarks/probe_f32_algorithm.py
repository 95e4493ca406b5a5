"""Few-row GEMMs with a float32 sum on the GPU: which XLA dot is as accurate as torch's, and at what cost?

    python3 benchmarks/probe_f32_algorithm.py --out $OUT/probe_f32_algorithm_h100.json
    .venv/bin/python benchmarks/probe_f32_algorithm.py --out /tmp/p.json --smoke   # CPU: errors only, small shapes

The projection budgets on the gpu backend allow an accuracy ratio of 15: from float32
operands ``precision=HIGHEST`` was 3-6x the error of torch's float32 GEMM there, and
float32 logits from bf16/f16 operands come from the tensor cores (probe_f32_logits.py).
Each case is ``x [M, D] . w [V, D]`` (the head's ``[V, D]`` layout, as the Qwen2 model
calls it) with a float32 result, against the float64 truth (max |y - truth| / max |truth|):

* ``xla_highest``: ``lax.dot_general(precision=HIGHEST, preferred_element_type=float32)``,
  what ``kernels._dot.dot_f32`` runs on the GPU today;
* ``xla_f32_f32_f32`` (float32 operands): ``precision=DotAlgorithmPreset.F32_F32_F32``,
  float32 products summed in float32 by name;
* ``xla_split``: ``kernels._dot.split_dot``, the CPU path's form: the D products in
  ``_chunk_count(D)`` chunks summed by XLA, then the chunk sums added;
* ``torch_gpu_f32``: ``F.linear`` of the operands upcast to float32 on the GPU, TF32 off
  (cuBLAS SGEMM: HF's float32 head); ``torch_gpu_tc`` (bf16 operands): ``torch.mm(out_dtype=float32)``;
* ``torch_cpu``: ``F.linear`` in float32 on the CPU (the oracle's GEMM);

and, on the GPU, the device time of every GPU side in turns (``devtime.in_turns``), with
the kernels each ran.

Result (H100, session 17, results/probe_f32_algorithm_h100.json, 3 rounds):

* ``F32_F32_F32`` is what ``HIGHEST`` already runs: the same kernels, the same bits
  (a float32 XLA dot on the H100 is IEEE float32, never TF32 or a bf16 split).
* One row (a decode step's head) is accurate already: XLA's GEMV sums as well as the
  split (bf16, D = 3584: 1.1e-7, against 5.5e-6 for torch's tensor-core GEMM and 1.6e-7
  for its float32 SGEMM) at full bandwidth (341 us, 3.19 TB/s of weight; torch's
  tensor-core GEMM 395 us).
* 2-8 rows lose it: XLA picks a tensor-core GEMM for bf16 operands (4 rows, D = 896:
  1.2e-6; 8 rows, D = 3584: 4.4e-6, equal to torch's tensor-core GEMM) and a Triton GEMM
  for float32 ones (2-4 rows: 1.5e-7 to 8.1e-7, 1-4.2x torch's SGEMM); the split is
  accurate (0.9e-7 to 1.3e-7) but costs 1.4-3x (float32) and 3.7-7.5x (bf16) the time,
  so ``dot_f32`` keeps the plain dot on the GPU: the budgets' ratio 15 on the gpu backend
  stands for these rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# (dtype, rows, D, V): decode-step heads at the 0.5B / 7B widths and a 128-wide head in
# float32; bf16 operands with float32 logits (lm_head_f32) at both Qwen2.5 heads.
CASES = (("float32", 4, 896, 4096), ("float32", 2, 128, 151936), ("float32", 4, 3584, 8192),
         ("float32", 1, 896, 151936), ("bfloat16", 1, 896, 151936), ("bfloat16", 4, 896, 151936),
         ("bfloat16", 1, 3584, 152064), ("bfloat16", 8, 3584, 152064))
SMOKE = (("float32", 4, 96, 256), ("bfloat16", 2, 128, 512))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.devtime import in_turns
    from kernels._dot import _chunk_count, split_dot

    gpu = torch.cuda.is_available() and jax.default_backend() == "gpu"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32, as HF's float32 head
    dims = (((1,), (1,)), ((), ()))  # x [M, D] . w [V, D] -> [M, V]
    rows = []
    for dt, m, d, v in SMOKE if args.smoke else CASES:
        rng = np.random.default_rng(m * d + v)
        tdt = getattr(torch, dt)
        tx = torch.from_numpy(rng.standard_normal((m, d)).astype(np.float32)).to(tdt)
        tw = torch.from_numpy((rng.standard_normal((v, d)) * d ** -0.5).astype(np.float32)).to(tdt)  # [V, D]
        dev = "cuda" if gpu else "cpu"
        gx, gw = tx.to(dev), tw.to(dev)
        truth = F.linear(gx.double(), gw.double()).cpu().numpy()  # float64 (on the GPU: fast, exact enough)
        scale = float(np.max(np.abs(truth)))

        def err(y):
            return float(np.max(np.abs(np.asarray(y, np.float64) - truth))) / scale

        jx = jnp.asarray(tx.float().numpy()).astype(dt)  # exact: the values are on dt's grid
        jw = jnp.asarray(tw.float().numpy()).astype(dt)
        c = _chunk_count(d)
        sides = {"xla_highest": jax.jit(lambda x, w: jax.lax.dot_general(
            x, w, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32))}
        if dt == "float32":
            sides["xla_f32_f32_f32"] = jax.jit(lambda x, w: jax.lax.dot_general(
                x, w, dims, precision=jax.lax.DotAlgorithmPreset.F32_F32_F32, preferred_element_type=jnp.float32))
        sides["xla_split"] = jax.jit(lambda x, w: split_dot(x, w, chunks=c, w_contract=1))
        row = {"dtype": dt, "rows": m, "d": d, "v": v, "chunks": c, "device": str(jax.devices()[0]),
               "error": {k: err(f(jx, jw)) for k, f in sides.items()}}
        row["error"]["torch_cpu"] = err(F.linear(tx.float(), tw.float()).double().numpy())
        if gpu:
            fx, fw = gx.float(), gw.float()
            row["error"]["torch_gpu_f32"] = err(F.linear(fx, fw).double().cpu().numpy())
            timed = {k: (lambda i, f=f: f(jx, jw), jax.block_until_ready) for k, f in sides.items()}
            timed["torch_gpu_f32"] = (lambda i: F.linear(fx, fw), lambda _: torch.cuda.synchronize())
            if dt != "float32":
                row["error"]["torch_gpu_tc"] = err(torch.mm(gx, gw.t(), out_dtype=torch.float32).double().cpu().numpy())
                timed["torch_gpu_tc"] = (lambda i: torch.mm(gx, gw.t(), out_dtype=torch.float32),
                                         lambda _: torch.cuda.synchronize())
            spans, kernels = in_turns(torch, timed, rounds=args.rounds)
            row["time_us"] = {k: statistics.median(s) * 1e6 for k, s in spans.items()}
            row["kernels"] = kernels
            row["weight_gb_s"] = {k: v * d * tw.element_size() / (t * 1e-6) / 1e9 for k, t in row["time_us"].items()}
        print(json.dumps({k: row[k] for k in row if k != "kernels"}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "jax": jax.__version__, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
