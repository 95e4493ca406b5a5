"""How accurate are float32 logits from a bf16/f16 GEMM on the GPU, ours and torch's?

    python3 benchmarks/probe_f32_logits.py --out $OUT/probe_f32_logits_h100.json
    .venv/bin/python benchmarks/probe_f32_logits.py --out /tmp/p.json   # CPU: the GPU columns are absent

The projection budgets on the gpu backend compare ``kernels.lm_head`` on the GPU with
the oracle run by torch on the CPU (MKL: IEEE float32 sums). On the GPU the kernel's
float32 logits come from a tensor-core GEMM. This probe puts, for each case, the error
against the float64 truth (max |y - truth| / max|truth|) of:

* ``ours``: ``kernels.lm_head`` on the default JAX device;
* ``oracle_cpu``: the oracle (torch CPU), what the budget divides by;
* ``torch_gpu_tc``: torch on the GPU, the same bf16/f16 operands, float32 out
  (``torch.mm(out_dtype=float32)``: cuBLAS, tensor cores);
* ``torch_gpu_f32``: torch on the GPU, HF's float32 head (``F.linear(h.float(), W.float())``,
  TF32 off: an IEEE float32 GEMM).

Cases: the ci-profile draws that broke the 30-example gpu budgets (their reproducers),
and a 7B-wide head (D = 3584) that the fuzzed shapes do not reach.

Result (H100, 2026-11-22, results/probe_f32_logits_h100.json; table in benchmarks/README.md):
from bf16/f16 operands our error equals torch's tensor-core GEMM's (f16, D = 896: 1.84e-6
each) or is below it (bf16, D = 3584: 8.9e-7 against 5.1e-6), and is 5-10x that of a
float32 GEMM (1.8e-7 to 2.5e-7, as accurate as the CPU oracle). From float32 operands
XLA's HIGHEST-precision dot is 3-6x torch's float32 GEMM error, far from TF32's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPROS = [
    # f16 lm_head_f32, D = 896: accuracy ratio 10.05 against the budget's 8
    '{"data": {"b_scale": 0.1, "fp16_headroom": 2.0, "w_std": "init", "x": {"log10_scale": [1, 1], "outlier_mult": '
    '20.0, "outliers": 0, "seed": 0, "special": "none", "tiny_rows": false}}, "dtype": "float16", "kwargs": {"recipe": '
    '"lm_head_f32", "w_layout": "DV"}, "op": "projection", "shapes": {"w": [896, 4096], "x": [4, 896]}}',
    # f32 lm_head_f32, D = 896: 162.75 ulps against the budget's 150
    '{"data": {"b_scale": 0.1, "fp16_headroom": 2.0, "w_std": "init", "x": {"log10_scale": [0, 0], "outlier_mult": '
    '20.0, "outliers": 0, "seed": 0, "special": "none", "tiny_rows": false}}, "dtype": "float32", "kwargs": {"recipe": '
    '"lm_head_f32", "w_layout": "DV"}, "op": "projection", "shapes": {"w": [896, 4096], "x": [4, 896]}}',
    # f32 lm_head, [V, D]: accuracy ratio 5.47 against the budget's 5
    '{"data": {"b_scale": 0.1, "fp16_headroom": 2.0, "w_std": "init", "x": {"log10_scale": [0, 0], "outlier_mult": '
    '20.0, "outliers": 0, "seed": 23219, "special": "nan", "tiny_rows": true}}, "dtype": "float32", "kwargs": '
    '{"recipe": "lm_head", "w_layout": "VD"}, "op": "projection", "shapes": {"w": [151936, 128], "x": [2, 128]}}',
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from oracles import projection as P
    from oracles.jaxsetup import configure_jax
    from oracles.registry import Case

    configure_jax()
    gpu = torch.cuda.is_available()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # HF's float32 head: IEEE float32, not TF32
    cases = [Case.from_json(r) for r in REPROS]
    for dt in ("bfloat16", "float16"):  # a 7B-wide head, float32 logits
        cases.append(Case(op="projection", dtype=dt, shapes={"x": (4, 3584), "w": (3584, 8192)},
                          kwargs={"recipe": "lm_head_f32", "w_layout": "DV"},
                          data={"x": {"seed": 7, "log10_scale": [0, 0], "outlier_mult": 20.0, "outliers": 0,
                                      "special": "none", "tiny_rows": False},
                                "w_std": "init", "b_scale": 0.1, "fp16_headroom": 0.9}))
    rows = []
    for case in cases:
        inp = P._inputs(case)
        kw = case.kwargs
        x, w = inp["x"], inp["w"]
        truth = P._oracle(inp, kw["recipe"], kw["w_layout"], exact=True).numpy()  # float64
        ok = np.isfinite(truth)
        scale = float(np.max(np.abs(truth[ok])))

        def err(y):
            y = np.asarray(y, np.float64)
            return float(np.max(np.abs(y[ok] - truth[ok]))) / scale

        ours = np.asarray(jax.jit(P.drive, static_argnames=("recipe", "w_layout"))(x, w, recipe=kw["recipe"],
                                                                                  w_layout=kw["w_layout"]))
        row = {"case": case.to_json(), "shapes": case.shapes, "dtype": case.dtype, "recipe": kw["recipe"],
               "ours_device": str(jax.devices()[0]), "ours": err(ours.astype(np.float64)),
               "oracle_cpu": err(P._oracle(inp, kw["recipe"], kw["w_layout"]).double().numpy())}
        if gpu:
            from oracles.arrays import to_torch

            tx, tw = to_torch(x).cuda(), to_torch(w).cuda()
            wv = tw if kw["w_layout"] == "VD" else tw.t().contiguous()  # [V, D]
            with torch.inference_mode():
                if case.dtype != "float32":
                    row["torch_gpu_tc"] = err(torch.mm(tx, wv.t(), out_dtype=torch.float32).double().cpu().numpy())
                row["torch_gpu_f32"] = err(F.linear(tx.float(), wv.float()).double().cpu().numpy())
        row["ours_vs_oracle"] = row["ours"] / row["oracle_cpu"] if row["oracle_cpu"] else None
        print(json.dumps({k: v for k, v in row.items() if k != "case"}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "jax": jax.__version__, "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
