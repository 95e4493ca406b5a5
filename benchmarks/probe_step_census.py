"""Where a whole Qwen2 decode step's time goes: every kernel of one step, named by its component.

    python3 benchmarks/probe_step_census.py --out $OUT/probe_step_census_h100.json   # on the GPU
    .venv/bin/python benchmarks/probe_step_census.py --smoke --out /tmp/c.json        # CPU: the HLO naming only

``kernels.models.qwen2.decode_step`` (random weights under the Qwen2.5 configs, bf16, batch
1, S = 32768 slots half filled, as ``probe_model_decode.py``) is compiled as the code is and
one step is traced on the device's clock (CUPTI, ``devtime``). The model runs each component
under ``jax.named_scope`` (``layers.{i}.{component}``, ``final_norm``, ``logits``), so each
XLA fusion's ``op_name`` in the compiled HLO names its component. A kernel of the trace is
named by the fusion it runs (XLA reuses one kernel for identical fusions: the component of
the first, the same computation); the kernels no fusion names (Pallas/Triton custom calls,
cuBLAS: one kernel a call) take the custom calls' components in program order, or, where
their counts differ, are listed by kernel name.

Per model: the kernels a step launches, the step's span and summed kernel time, and per
component (``q_proj``, ``input_layernorm``, ... without the layer) the kernels a step, their
summed device time and the largest; plus the whole ordered list of one step's kernels.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\b(fusion|custom-call)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def component(op_name: str) -> str:
    """The model component in an ``op_name`` name stack, the layer dropped: ``q_proj``,
    ``final_norm``; ``step`` for ops outside every component (the mask, positions)."""
    for part in op_name.split(";")[0].split("/"):
        m = re.fullmatch(r"layers\.\d+\.(\w+)", part)
        if m:
            return m.group(1)
        if part in ("final_norm", "logits", "embedding", "rope_tables"):
            return part
    return "step"


def _kernel_name(instr: str) -> str:
    """The kernel XLA emits for a fusion is named after it, '.' and '-' made '_'."""
    return re.sub(r"[.\-]", "_", instr)


def hlo_components(hlo: str) -> tuple[dict, list]:
    """(kernel name of each fusion -> component, the custom calls' components in program order)."""
    by_kernel, calls = {}, []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        op = _OPNAME.search(line)
        comp = component(op.group(1)) if op else "step"
        if m.group(2) == "fusion":
            by_kernel[_kernel_name(m.group(1))] = comp
        else:
            calls.append(comp)
    return by_kernel, calls


def name_kernels(names: list, by_kernel: dict, calls: list) -> list:
    """Each traced kernel's component: its fusion's; the kernels no fusion names (Triton
    custom calls, cuBLAS: one kernel a call) take the custom calls' components in program
    order when they are as many, else ``? <kernel name>``."""
    rest = [n for n in names if n not in by_kernel]
    it = iter(calls) if len(rest) == len(calls) else None
    return [by_kernel[n] if n in by_kernel else (next(it) if it else f"? {n[:40]}") for n in names]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU: two layers, 256 slots, the HLO naming only")
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--slots", type=int, default=32768)
    ap.add_argument("--hlo-dir", help="write each model's compiled step here (gzipped HLO text)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from probe_model_decode import step_inputs

    from kernels.models import qwen2 as M

    slots = 256 if args.smoke else args.slots
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "slots": slots, "fill": slots // 2, "models": {}}
    for name in args.models.split(","):
        cfg, params, kv = step_inputs(name, slots, layers=2 if args.smoke else None)
        cache = {**kv, "length": jnp.int32(slots // 2)}
        ids = jnp.ones((1, 1), jnp.int32)  # [B, T]
        step = jax.jit(M._step, static_argnames=("cfg", "logits_dtype"), donate_argnums=(1,)).lower(
            params, cache, ids, cfg=cfg, logits_dtype=None).compile()
        hlo = step.as_text()
        by_kernel, calls = hlo_components(hlo)
        row = {"hlo_fusions_by_component": dict(collections.Counter(by_kernel.values()).most_common()),
               "hlo_custom_calls": len(calls)}
        if args.hlo_dir:  # the compiled program, to read a component's fusions
            with gzip.open(Path(args.hlo_dir) / f"step_{name}.hlo.txt.gz", "wt") as f:
                f.write(hlo)
        res["models"][name] = row
        if not args.smoke:
            row.update(_trace(step, params, cache, ids, by_kernel, calls))
            print(name, f"{row['kernels']} kernels, span {row['span_us']:.1f} us, busy {row['busy_us']:.1f} us",
                  flush=True)
            for comp, c in row["by_component"].items():
                print(f"  {comp:28s} {c['kernels']:4d} kernels {c['us']:8.1f} us  largest {c['largest']}", flush=True)
        del params, cache, step
        with open(args.out, "w") as f:  # after each model: a later one may run out of time
            json.dump(res, f, indent=1)


def _trace(step, params, cache, ids, by_kernel, calls) -> dict:
    """One step's kernels on the device's clock (the third of three traced steps)."""
    import jax
    import torch

    from devtime import traced_calls

    state = dict(cache)

    def call(i):
        logits, new = step(params, state, ids)
        state.update(new)  # the donated cache's successor
        return logits

    groups = traced_calls(torch, call, jax.block_until_ready, 3)
    g = groups[-1]
    comps_in_order = name_kernels([e.name for e in g], by_kernel, calls)
    kernels = [{"name": e.name[:80], "component": c,
                "start_us": round(e.time_range.start - g[0].time_range.start, 2),
                "us": round(e.time_range.end - e.time_range.start, 2)} for e, c in zip(g, comps_in_order)]
    comps: dict = {}
    for k in kernels:
        c = comps.setdefault(k["component"], {"kernels": 0, "us": 0.0, "names": collections.Counter()})
        c["kernels"] += 1
        c["us"] += k["us"]
        c["names"][k["name"][:50]] += k["us"]
    by_component = {n: {"kernels": c["kernels"], "us": round(c["us"], 1),
                        "largest": [(k, round(v, 1)) for k, v in c["names"].most_common(3)]}
                    for n, c in sorted(comps.items(), key=lambda kv: -kv[1]["us"])}
    return {"groups_traced": len(groups), "kernels": len(g),
            "span_us": g[-1].time_range.end - g[0].time_range.start,
            "busy_us": sum(k["us"] for k in kernels), "by_component": by_component, "step_kernels": kernels}


if __name__ == "__main__":
    main()
