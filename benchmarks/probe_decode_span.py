"""Decode against a partly filled cache: the split-key kernels read only the visible span.

    python3 benchmarks/probe_decode_span.py --out $OUT/probe_decode_span_h100.json
    .venv/bin/python benchmarks/probe_decode_span.py --smoke --out /tmp/p.json   # interpret mode, CPU

A decode loop preallocates its cache (``kernels.models.qwen2.init_cache``: S slots) and
masks the unfilled slots (``kv_valid``, positions). The split-key kernels now deal out each
batch row's span of visible key blocks over their splits (``attention_pallas._split_blocks``)
instead of reading every block. One token against S = 32768 slots filled to ``fill`` keys,
Qwen2.5-7B (N 28, K 4, H 128) and 0.5B (N 14, K 2, H 64), bf16, with the masks of the
model's decode step (``q_positions = fill - 1``, ``kv_positions = s``,
``kv_valid = s < fill``), for the GPU default (``"pallas"``, recipe "hf"), ``"pallas_flash"``
and ``"mosaic_flash"`` (its span since session 23: ``--impls``, ``--before-mosaic``).

Side by side in one run, in turns (``devtime.in_turns``: 4 input sets a call, so no set is
L2-resident when it is used):

* ``span``: the masks above: the kernels read blocks ``0 .. ceil(fill / 64) - 1``;
* ``whole``: the same masks and one more visible key, in the cache's last slot (its
  position ``fill - 1``): the span is the whole cache, every block is read, as every
  decode step was before (the same kernel, the same mask work);
* ``no mask`` (fill = S only): every key visible without masks, the static splits: the
  cost of the masks (their vectors and the span) when the span is the whole cache. The
  full-cache calls are also traced once more for every kernel (``breakdown``);
* ``before`` (``--before``, the Pallas paths; ``--before-mosaic``, ``mosaic_flash``): the
  same masks on the kernels as they were (a copy of the module before its span), which
  read every block.

Each row also holds the ``span`` output's error against the float64 truth (max |out -
truth| / max |truth|, set 0) beside the XLA path's, so a fast wrong kernel cannot pass.

Result (H100, 2026-11-23, results/probe_decode_span_h100.json, copy 3009 GB/s; in turns,
before / span): a 7B step with 512 of 32768 slots filled, default 36.33 / 9.20 us (3.95x),
``pallas_flash`` 29.80 / 7.14 (4.17x); half filled 1.54x and 1.52x; a full cache 0.98x and
0.97x (the span's reduction and launch, 0.6-1.1 us). 0.5B: 1.99x, 2.02x at 512 slots, 0.94x
and 0.97x full. ``mosaic_flash`` then read every block at every fill (28.5-29.2 us). The
span outputs' error against the float64 truth equals the XLA path's ("hf") or is lower
(flash). Table and reading: benchmarks/README.md (session 22).

``mosaic_flash`` with its span (session 23, ``--impls mosaic_flash,pallas_flash
--before-mosaic``, results/probe_decode_span_mosaic_h100.json, copy 3006 GB/s): 7B 7.27 us
against 28.71 before at 512 slots (3.95x), 18.50 against 28.84 half filled, 30.22 against
29.16 full (0.965x); 0.5B 1.90x at 512 slots, 0.93x full. Beside ``pallas_flash`` in the
same run: faster at 7B from 4096 slots on (30.22 against 31.35 full), slower at 0.5B.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--impls", default="default,pallas_flash,mosaic_flash", help="which of them to time")
    ap.add_argument("--before", help="a copy of kernels/attention_pallas.py before the span (git show "
                                     "fdf3f38:kernels/attention_pallas.py): its kernels timed beside, as 'before'")
    ap.add_argument("--before-mosaic", help="a copy of kernels/attention_mosaic.py before its span (git show "
                                            "02cf21e:kernels/attention_mosaic.py): timed beside, as 'before'")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from devtime import copy_gb_s, device_span, in_turns

    from kernels.attention import gqa_attention

    f32, bf16 = jnp.float32, jnp.bfloat16
    smoke = args.smoke
    torch = None
    if not smoke:
        import torch
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "smoke": smoke, "rows": []}
    res["copy_gb_s"] = copy = 1.0 if smoke else copy_gb_s(torch, calls=args.trials)
    print(f"copy {copy:.0f} GB/s", flush=True)
    key = jax.random.PRNGKey(0)
    S = 1024 if smoke else 32768
    fills = [S // 64, S // 8, S // 2, S]
    models = {"7b": (28, 4, 128), "0.5b": (14, 2, 64)}
    impls = {"pallas hf (default)": dict(recipe="hf"),
             "pallas_flash": dict(recipe="fp32_logits", implementation="pallas_flash"),
             "mosaic_flash": dict(recipe="fp32_logits", implementation="mosaic_flash")}
    wanted = {"default" if name.startswith("pallas hf") else name for name in args.impls.split(",")}
    impls = {name: o for name, o in impls.items() if ("default" if name.startswith("pallas hf") else name) in wanted
             and not (smoke and name == "mosaic_flash")}  # mosaic_flash needs a Hopper GPU

    def load(name, path):  # a module as it was, loaded under its own name (it imports kernels.* as usual)
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    before = {}
    if args.before:
        before["pallas"] = load("attention_pallas_before", args.before)
        res["before"] = args.before
    if args.before_mosaic:
        before["mosaic_flash"] = load("attention_mosaic_before", args.before_mosaic)
        res["before_mosaic"] = args.before_mosaic

    def randn(shape, i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, f32).astype(bf16)

    def masks(fill, whole):
        kpos = np.arange(S, dtype=np.int32)
        valid = kpos < fill
        if whole:  # one more visible key in the last slot: the span is the whole cache
            kpos[-1], valid[-1] = fill - 1, True
        return dict(q_positions=jnp.array([[fill - 1]], jnp.int32), kv_positions=jnp.asarray(kpos[None]),
                    kv_valid=jnp.asarray(valid[None]))

    def truth(q, k, v, m):
        """float64 attention [B, 1, N, H] of set 0 under the masks ``m``."""
        q, k, v = (np.asarray(x.astype(f32), np.float64) for x in (q, k, v))
        n, h, kh = q.shape[2], q.shape[3], k.shape[2]
        sc = np.einsum("bnh,bsnh->bns", q[:, 0], np.repeat(k, n // kh, axis=2)) * h ** -0.5  # [B, N, S]
        vis = np.asarray(m["kv_valid"]) & (np.asarray(m["kv_positions"]) <= np.asarray(m["q_positions"]))  # [B, S]
        sc = np.where(vis[:, None], sc, -np.inf)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bns,bsnh->bnh", p, np.repeat(v, n // kh, axis=2))[:, None]  # [B, 1, N, H]

    def err(out, want):
        return float(np.abs(np.asarray(out.astype(f32), np.float64) - want).max() / np.abs(want).max())

    sides = {}
    for model, (N, K, H) in models.items():
        sets = [(randn((1, 1, N, H), 3 * i), randn((1, S, K, H), 3 * i + 1), randn((1, S, K, H), 3 * i + 2))
                for i in range(4)]
        for fill in fills:
            m_span = masks(fill, whole=False)
            want = truth(*sets[0], m_span)
            xla_err = err(gqa_attention(*sets[0], **m_span, recipe="hf", implementation="xla"), want)
            variants = [("span", m_span), ("whole", masks(fill, whole=True))] + ([("no mask", {})] if fill == S else [])
            for impl, opts in impls.items():
                if smoke and impl != "pallas hf (default)":
                    opts = dict(opts, implementation="xla")  # the Pallas GPU paths need a GPU
                old = before.get("mosaic_flash" if impl == "mosaic_flash" else "pallas")
                was = [("before", m_span)] if old is not None else []
                for variant, m in variants + was:
                    fn = functools.partial(gqa_attention, **m, **opts)
                    if variant == "before" and impl == "mosaic_flash":  # what gqa_attention called
                        fn = functools.partial(old.mosaic_attention, **m, scale=H ** -0.5, causal=True,
                                               segment_ids=None, sliding_window=None, softcap=None,
                                               recipe="fp32_logits")
                    elif variant == "before":  # what gqa_attention called: pallas_attention, flash for pallas_flash
                        fn = functools.partial(old.pallas_attention, **m, recipe=opts["recipe"],
                                               flash=opts.get("implementation") == "pallas_flash", interpret=smoke)
                    row = dict(model=model, fill=fill, impl=impl, variant=variant, bytes_read=2 * fill * K * H * 2)
                    try:
                        if variant == "span":
                            row.update(err_vs_f64=err(fn(*sets[0]), want), xla_err_vs_f64=xla_err)
                        g = jax.jit(lambda ss, fn=fn: [fn(*s) for s in ss])
                        jax.block_until_ready(g(sets))  # compiled before the turns
                        sides[(model, fill, impl, variant)] = (g, sets)
                    except Exception as e:  # noqa: BLE001 - a path that cannot run here is a result too
                        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    res["rows"].append(row)
                    print(row, flush=True)

    if not smoke:
        for model in models:  # one model's sides in turns at a time
            names = [s for s in sides if s[0] == model]
            calls = {s: (functools.partial(lambda i, g, ss: g(ss), g=sides[s][0], ss=sides[s][1]),
                         jax.block_until_ready) for s in names}
            spans, kernels = in_turns(torch, calls, rounds=args.rounds, calls=args.trials)
            for row in res["rows"]:
                s = (row["model"], row["fill"], row["impl"], row["variant"])
                if s in spans:
                    per = [x / 4 * 1e6 for x in spans[s]]
                    row.update(us_rounds=per, us=statistics.median(per), kernels=kernels[s])
        for row in res["rows"]:  # every kernel of the full-cache calls: what the masks cost
            s = (row["model"], row["fill"], row["impl"], row["variant"])
            if row["fill"] == S and s in sides:
                g, ss = sides[s]
                d = device_span(torch, lambda i, g=g, ss=ss: g(ss), jax.block_until_ready, len(ss), calls=args.trials,
                                top=12)
                row["breakdown"] = {k: d[k] for k in ("span_s", "busy_s", "kernels_per_app", "top_kernels_s") if k in d}
        for row in res["rows"]:
            if row["variant"] == "span" and "us" in row:
                whole = next(r for r in res["rows"] if r["variant"] == "whole" and
                             all(r[k] == row[k] for k in ("model", "fill", "impl")))
                row["whole_over_span"] = whole.get("us", float("nan")) / row["us"]
                was = [r for r in res["rows"] if r["variant"] == "before" and
                       all(r[k] == row[k] for k in ("model", "fill", "impl"))]
                if was and "us" in was[0]:
                    row["before_over_span"] = was[0]["us"] / row["us"]
                row["frac_of_copy"] = row["bytes_read"] / (row["us"] * 1e-6) / 1e9 / copy
                print(row["model"], row["fill"], row["impl"], f"{row['us']:.2f} us span, {whole.get('us'):.2f} whole",
                      flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
