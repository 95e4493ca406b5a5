"""A whole Qwen2 decode step against a partly filled cache: what the decode kernels' span buys.

    python3 benchmarks/probe_model_decode.py --before benchmarks/_attention_pallas_before.py \\
        --out $OUT/probe_model_decode_h100.json       # on the GPU; the copy: git show fdf3f38:kernels/attention_pallas.py

``kernels.models.qwen2.decode_step`` (random weights under the Qwen2.5 configs, bf16,
model-dtype logits, batch 1) against a cache of S = 32768 slots filled to ``fill`` keys.
Every layer's attention is the GPU default (``"pallas"``, recipe "hf"), which since
session 22 reads only each batch row's span of visible key blocks. Side by side in one
run, in turns (``devtime.in_turns``, the device's clock):

* ``span``: the code as it is;
* ``before``: the same step with ``kernels.attention_pallas.pallas_attention`` replaced
  by the module before the span (``--before``), which read every block of the cache.

Each side threads its own cache (the step donates it), so a fill grows by one key a call
(at most ~20 over the run). ``kernels_per_step`` says how many kernels a step launches:
its difference between the sides is what the span adds, one reduction for the whole step
if XLA merged the layers' identical span computations, one a layer if not. Both sides are
compiled ahead of time, each after ``jax.clear_caches()``, so that no inner jit's trace of
one module serves the other.

Result (H100, 2026-11-23, results/probe_model_decode_h100.json; span / before, medians of 3
rounds): 0.5B 1517.7 / 1736.9 us at 512 filled slots (1.144x), 1664.9 / 1737.7 half filled,
1748.4 / 1738.0 full (0.994x); 7B 7093.4 / 7777.7 (1.096x), 7498.9 / 7780.2, 7776.4 /
7776.5 (1.000x). 589 / 587 kernels a 0.5B step, 629 / 627 a 7B step: XLA computes the
layers' span once. Reading: benchmarks/README.md (session 23).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def random_params(cfg, key):
    """The Qwen2 model's parameters for ``cfg``, random (normal, fan-in scaled; norms near 1),
    bf16, made on the device: the whole-step probes' weights."""
    import jax
    import jax.numpy as jnp

    from kernels.models import qwen2 as M

    state = {}
    for i, (hf_name, shape) in enumerate(M.expected_shapes(cfg).items()):
        w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * (shape[-1] ** -0.5)
        state[hf_name] = (1.0 + 0.3 * w if "norm" in hf_name else w).astype(jnp.bfloat16)
    return M.params_from_hf(state, cfg, jnp.bfloat16)


def random_kv(cfg, key, slots):
    """A random bf16 KV cache of ``slots`` slots a layer: ``{"k": [...], "v": [...]}``, each
    ``[1, slots, K, H]``; the whole-step probes' cache contents."""
    import jax
    import jax.numpy as jnp

    shape = (1, slots, cfg.num_key_value_heads, cfg.head_dim)  # [B, S, K, H] a layer
    return {n: [jax.random.normal(jax.random.fold_in(key, 10_000 * (j + 1) + i), shape, jnp.bfloat16)
                for i in range(cfg.num_hidden_layers)] for j, n in enumerate(("k", "v"))}


def step_inputs(model: str, slots: int, *, layers: int | None = None):
    """``(cfg, params, kv)`` for a whole-step probe: the Qwen2.5 config ``model`` (``layers``
    of them, if given), its random weights and a random cache of ``slots`` slots (key 0)."""
    import dataclasses

    import jax

    from kernels.models import qwen2 as M
    from oracles.diverge import preset

    cfg = M.Config.from_hf(preset(model))
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    key = jax.random.PRNGKey(0)
    return cfg, random_params(cfg, key), random_kv(cfg, key, slots)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--before", required=True, help="kernels/attention_pallas.py before the span")
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--slots", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)

    import importlib.util

    import jax
    import jax.numpy as jnp
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kernels.attention_pallas as kp
    from devtime import device_span, in_turns
    from kernels.models import qwen2 as M

    spec = importlib.util.spec_from_file_location("attention_pallas_before", args.before)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)

    S = args.slots
    fills = [512, S // 2, S - 64]
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "slots": S, "before": args.before, "rows": []}
    for name in args.models.split(","):
        cfg, params, kv = step_inputs(name, S)
        ids = jnp.ones((1, 1), jnp.int32)  # [B, T]

        steps = {}
        cache = {"k": kv["k"], "v": kv["v"], "length": jnp.int32(fills[0])}
        for variant in ("span", "before"):  # each traced and compiled ahead of time under its own module
            real = kp.pallas_attention
            if variant == "before":
                kp.pallas_attention = before.pallas_attention  # gqa_attention imports it at trace time
            jax.clear_caches()  # no inner jit's trace of the other module is reused
            try:
                steps[variant] = jax.jit(M._step, static_argnames=("cfg", "logits_dtype"), donate_argnums=(1,)).lower(
                    params, cache, ids, cfg=cfg, logits_dtype=None).compile()
            finally:
                kp.pallas_attention = real
                jax.clear_caches()
            res.setdefault("hlo_pallas_calls", {})[f"{name} {variant}"] = \
                steps[variant].as_text().count("__gpu$xla.gpu.triton")

        sides, states = {}, {}
        for fill in fills:
            for variant, step in steps.items():
                st = states[(variant, fill)] = {"k": [jnp.copy(x) for x in kv["k"]],
                                                "v": [jnp.copy(x) for x in kv["v"]], "length": jnp.int32(fill)}

                def call(i, st=st, step=step):
                    logits, new = step(params, {k: st[k] for k in ("k", "v", "length")}, ids)
                    st.update(new)  # the donated cache's successor
                    return logits

                sides[(variant, fill)] = (call, jax.block_until_ready)
        spans, _ = in_turns(torch, sides, rounds=args.rounds, calls=args.trials)
        for fill in fills:
            row = {"model": name, "fill": fill}
            for variant in steps:
                per = [x * 1e6 for x in spans[(variant, fill)]]
                row[f"{variant}_us_rounds"] = per
                row[f"{variant}_us"] = statistics.median(per)
                d = device_span(torch, sides[(variant, fill)][0], jax.block_until_ready, calls=2, top=6)
                row[f"{variant}_kernels_per_step"] = d.get("kernels_per_app")
                row[f"{variant}_busy_us"] = d.get("busy_s", float("nan")) * 1e6
                row[f"{variant}_top_kernels_s"] = d.get("top_kernels_s")
            row["before_over_span"] = row["before_us"] / row["span_us"]
            res["rows"].append(row)
            print(name, fill, f"span {row['span_us']:.1f} us, before {row['before_us']:.1f} us "
                  f"({row['before_over_span']:.3f}x); kernels {row['span_kernels_per_step']} / "
                  f"{row['before_kernels_per_step']}", flush=True)
        del params, kv, states, sides, steps
        with open(args.out, "w") as f:  # after each model: a later one may run out of time
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
