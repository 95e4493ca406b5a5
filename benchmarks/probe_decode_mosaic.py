"""A decode step read by TMA: ``kernels.attention_mosaic`` against the Triton flash kernel, timed.

    python3 benchmarks/probe_decode_mosaic.py [--read | --fused | --ship] --out $OUT/probe_decode_mosaic_h100.json

The Triton flash decode (``implementation="pallas_flash"``) streams the KV cache at
0.86 of copy with its own loads, and the split combine adds 2.4-2.9 us (a 7B step:
28.5 us, 0.78 of copy; the target is 0.85). ``kernels.attention_mosaic`` keeps the same
flash numerics but loads k and v by TMA, several blocks ahead, from a warpgroup of its own.

Part 0 (``--read``): bare TMA reads of a 7B cache (64 MiB of k and v, nothing computed) by
layout: one kv head a program ([bk, H] boxes, rows K * H apart, as the kernels read),
every head of a key range a program ([bk, K * H], contiguous), and HF's [K, S, H] layout.
Part 1, a sweep: each config of the Mosaic kernel (key block, stages, splits, compute
warpgroups, exp, how q is loaded) on Qwen2.5-7B (N 28, K 4, H 128) and 0.5B (N 14, K 2,
H 64), one token against S = 32768 keys, bf16, on the device's clock
(``devtime.grouped_span``: one program over 4 input sets, 4 x 64 MiB of cache, so no
set is L2-resident when it is read). Numbers on set 0: the error against the float64
truth (max |out - truth| / max |truth|), the largest distance from the Triton flash
output in bf16 ulps, the share of outputs identical to it and the outputs moved a query
head. A config that fails to compile or run is recorded with its error.
Part 2, in turns (``devtime.in_turns``, ``--rounds``): the Triton flash kernel, the two
fastest Mosaic configs of each model and an XLA read of the same cache.
Part 3 (``--fused``, alone): the split combine inside the kernel (``fuse=True``) against
the same kernel with the combine as a second launch and the Triton kernel, plus two
trimmed fused kernels that break its tail down (``_decode(trim=...)``): bits, run-to-run
identity, the error against the truth, kernel times and the steps in turns.
Part 4 (``--ship``, alone): the shipped ``gqa_attention(implementation="mosaic_flash")``
against ``"pallas_flash"``, every key visible and with a ``kv_valid`` mask (all True;
half the cache filled, as a preallocated cache is): bits, error against the truth, the
steps in turns.

Result (H100, 2026-11-22; results/probe_decode_mosaic_h100.json, copy 3008 GB/s, and
results/probe_decode_mosaic_read_h100.json for part 0 and the earlier sweeps):

* A bare TMA read of the 64 MiB takes 23.6-24.4 us (0.92-0.94 of copy) whatever the
  layout: strided heads 23.9, contiguous rows 23.9, HF's [K, S, H] 24.0. The layout is
  not what holds decode back.
* The Mosaic kernel computes the same thing (99.8-99.9% of outputs bit-identical to the
  Triton kernel with its splits and blocks, the rest 1 ulp; up to 14 ulps on tiny
  outputs with ex2.approx, Triton's own exp). Its main kernel: 25.0 us (2 stages, approx
  exp; 25.3 precise) against the Triton kernel's 25.9. In turns, a 7B step: 27.18 us
  against 28.46 (0.82 of copy against 0.78); 0.5B (3 stages): 11.32 against 11.83.
* What did not help: two compute warpgroups (27.3 us main), 128-key blocks (26.8-27.3),
  other splits (28-29), more stages at 7B (25.5-25.6 with 3-4).
  What did: issuing q's TMA first from the memory warpgroup (25.6 -> 25.0 at 2 stages):
  while the compute warpgroup staged q itself (zeros, TMA, wait) the whole pipeline
  started late. The 1 us left between the kernel and a bare read is the last blocks'
  compute, which no load overlaps.
* Not shipped this session: 0.82 is still short of 0.85, and the combine (2.3 us, a
  second launch) would have to move into the kernel for that; as a fourth attention
  implementation it needs its own budgets and tests, which did not fit.
* Part 3 (session 13, results/probe_decode_fused_mosaic_h100.json, copy 3009 GB/s): the
  fused combine is slower, 28.29 us a 7B step in turns against 27.54 with the second
  launch (kernel 28.26 against 25.31 + 2.34); its tail: synchronisation 0.6 us, the
  waiters' loads and sums 0.8, returning the semaphores to zero 1.5. Waiting only (no
  combine) the step is 26.38 us, 0.845 of copy (0.852 in a one-round re-run): 0.85
  needs a faster main kernel, not a cheaper combine. Outputs identical on every
  repeated run, within 1 ulp of the two-launch combine.
* Part 4 (session 14, results/probe_decode_mosaic_ship_h100.json; ``--stages``:
  results/probe_decode_mosaic_stages{,_records}_h100.json): the shipped
  ``mosaic_flash``, a 7B step 28.02 us against 28.88 for ``pallas_flash`` (0.5B: 12.43
  against 12.53); with ``kv_valid`` 0.99-1.07x ``pallas_flash``'s time. The first masked
  kernel zeroed every block's masked v rows (0.6-1.1 us a step); the records' visible-key
  count now skips that in blocks with every key visible.
* Loading q: TMA into an 8-row-tiled buffer needs N % 8 == 0 (N = 28 fails); 1-row tiles,
  then a register round trip into wgmma's layout, take any N (``q_mode="rows"``); padding
  q in XLA costs a 1.4 us launch. A stage count that is not a multiple of the compute
  warpgroups hangs the kernel (a barrier's phase is tracked by each waiter).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import traceback
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the first config of each model only, no turns")
    ap.add_argument("--read", action="store_true", help="part 0 first: bare TMA reads of a 7B cache, by layout")
    ap.add_argument("--fused", action="store_true", help="part 3 only: the split combine fused into the kernel")
    ap.add_argument("--ship", action="store_true", help="part 4 only: gqa_attention's mosaic_flash, with masks")
    ap.add_argument("--stages", default="", help="part 4: instead, the Mosaic kernel's stages (e.g. 2,3,4), masked "
                                                 "or not, beside pallas_flash")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    sys.path.insert(0, str(here.parent))
    from devtime import copy_gb_s, grouped_span
    from probe_mosaic_gemm import ulps_16bit

    from kernels.attention import gqa_attention
    from kernels.attention_mosaic import default_splits, mosaic_decode

    f32, bf16 = jnp.float32, jnp.bfloat16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "sweep": [], "turns": {}}
    res["copy_gb_s"] = copy = copy_gb_s(torch, calls=args.calls)
    print(f"copy {copy:.0f} GB/s", flush=True)
    key = jax.random.PRNGKey(0)

    def save():
        Path(args.out).write_text(json.dumps(res, indent=1))

    def randn(shape, i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, f32).astype(bf16)

    def truth(q, k, v):
        """float64 attention of one query against every key, [B, 1, N, H]."""
        q, k, v = (np.asarray(x.astype(f32), np.float64) for x in (q, k, v))
        n, kh = q.shape[2], k.shape[2]
        kr, vr = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)  # [B, S, N, H]
        sc = np.einsum("btnh,bsnh->bnts", q, kr) * q.shape[-1] ** -0.5  # [B, N, 1, S]
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bnts,bsnh->btnh", p, vr)  # [B, 1, N, H]

    if args.read:
        part_read(args, res, save, jax, jnp, np, torch, grouped_span, copy)
    models = {"7b": (28, 4, 128), "0.5b": (14, 2, 64)}
    S = 32768
    if args.fused:
        part_fused(args, res, save, jax, jnp, np, torch, randn, truth, models, S, copy)
        return
    if args.ship:
        part_ship(args, res, save, jax, jnp, np, torch, randn, truth, models, S, copy)
        return
    num_sms = jax.devices()[0].core_count
    turn_sides = {}
    for model, (N, K, H) in models.items():
        sets = step_sets(randn, N, K, H, S)
        nbytes = 2 * S * K * H * 2  # k and v read once
        want = truth(*sets[0])
        flash = functools.partial(gqa_attention, recipe="fp32_logits", implementation="pallas_flash")
        flash_out = np.asarray(flash(*sets[0]))
        scale = H ** -0.5
        sp = default_splits(S, K, block_k=64, num_sms=num_sms)  # with 2 compute warpgroups a program
        base = dict(block_k=64, stages=4, num_splits=sp, wgs=1, approx=True)
        # The ways of loading q first; the other configs use the fastest that works.
        configs = [dict(base, q_mode=m) for m in ("rows", "padded")]
        more = [dict(stages=2), dict(stages=3), dict(approx=False), dict(approx=False, stages=2)]
        if args.quick:
            configs, more = configs[:1], []
        sides = {"triton pallas_flash": flash}

        def mosaic_side(c):
            name = "mosaic " + " ".join(f"{k}={v}" for k, v in c.items())
            sides[name] = functools.partial(mosaic_decode, scale=scale, **c)
            return name

        rows = []

        def measure(name):
            fn = sides[name]
            row = dict(model=model, side=name)
            try:
                out = np.asarray(fn(*sets[0]))
                got = out.astype(np.float64)
                row.update(err_vs_f64=float(np.abs(got - want).max() / np.abs(want).max()),
                           ulps_vs_triton=ulps_16bit(np, out, flash_out),
                           same_as_triton=float(np.mean(out.view(np.uint16) == flash_out.view(np.uint16))),
                           moved_by_head=np.sum(out.view(np.uint16) != flash_out.view(np.uint16),
                                                axis=(0, 1, 3)).tolist())
                d = grouped_span(jax, torch, fn, sets, calls=args.calls)
                row.update(us=d["span_s"] * 1e6, frac=nbytes / d["span_s"] / 1e9 / copy,
                           kernels={k: round(v * 1e6, 2) for k, v in d["top_kernels_s"].items()})
            except Exception as e:  # noqa: BLE001 - a config that fails is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                print(traceback.format_exc()[-1200:], flush=True)
            print(row, flush=True)
            rows.append(row)
            res["sweep"].append(row)
            save()
            return row

        measure("triton pallas_flash")
        first = [measure(mosaic_side(c)) for c in configs]
        good = sorted((r for r in first if "us" in r), key=lambda r: r["us"])
        if good:
            q_mode = configs[first.index(good[0])]["q_mode"]
            for d in more:
                measure(mosaic_side(dict(base, q_mode=q_mode, **d)))
        ok = sorted((r for r in rows if "us" in r and r["side"].startswith("mosaic")), key=lambda r: r["us"])
        for name in ["triton pallas_flash"] + [r["side"] for r in ok[:2]]:
            turn_sides[f"{model} {name}"] = (sides[name], sets, nbytes)
        turn_sides[f"{model} XLA max over k and v"] = (
            lambda q, k, v: jnp.maximum(jnp.max(k, axis=1), jnp.max(v, axis=1)), sets, nbytes)

    if not args.quick:
        run_turns(args, res, jax, torch, turn_sides, copy)
    res["copy_gb_s_end"] = copy_gb_s(torch, calls=args.calls)
    save()


def step_sets(randn, N, K, H, S):
    """Four decode steps' inputs ``(q [1,1,N,H], k [1,S,K,H], v [1,S,K,H])``, 4 x the cache
    bytes apart, so that no set is L2-resident when it is read."""
    return [(randn((1, 1, N, H), 3 * i), randn((1, S, K, H), 3 * i + 1), randn((1, S, K, H), 3 * i + 2))
            for i in range(4)]


def part_fused(args, res, save, jax, jnp, np, torch, randn, truth, models, S, copy):
    """Part 3: the split combine inside the kernel (``fuse=True``: the head's last H / 16
    programs wait on a semaphore for every split's partials and sum 16 columns each)
    against the same kernel with the combine as a second launch, and the Triton kernel:
    bits (against each other, and the fused kernel against itself over repeated runs: a
    missing acquire or release would show as run-to-run noise), the error against the
    float64 truth, and the time in turns."""
    from devtime import grouped_span
    from probe_mosaic_gemm import ulps_16bit

    import kernels.attention_mosaic as mdk
    from kernels.attention import gqa_attention
    from kernels.attention_mosaic import mosaic_decode

    def trimmed(q, k, v, **kw):
        """The fused kernel with part of its tail left out (``mdk.TRIMS``): a timing
        breakdown, its outputs not what it computes."""
        sp = mdk.default_splits(k.shape[1], k.shape[2], block_k=64, num_sms=jax.devices()[0].core_count)
        return mdk._decode(q, k, v, block_k=64, num_splits=sp, wgs=1, q_mode="rows", approx=True, **kw)

    res["fused"] = {}
    turn_sides = {}
    for model, (N, K, H) in models.items():
        sets = step_sets(randn, N, K, H, S)
        nbytes = 2 * S * K * H * 2
        want = truth(*sets[0])
        sides = {"triton pallas_flash": functools.partial(gqa_attention, recipe="fp32_logits",
                                                          implementation="pallas_flash")}
        st = 2 if model == "7b" else 3  # the faster stages of each (part 1)
        for fuse in (False, True):
            sides[f"mosaic stages={st} fuse={fuse}"] = functools.partial(
                mosaic_decode, scale=H ** -0.5, stages=st, fuse=fuse, approx=True)
        for trim in ("reset", "sum"):
            sides[f"mosaic stages={st} fuse=True trim={trim}"] = functools.partial(
                trimmed, trim=trim, scale=H ** -0.5, stages=st, fuse=True)
        outs = {}
        for name, fn in sides.items():
            row = dict(model=model, side=name)
            try:
                out = np.asarray(fn(*sets[0]))
                outs[name] = out
                row["err_vs_f64"] = float(np.abs(out.astype(np.float64) - want).max() / np.abs(want).max())
                if "fuse=True" in name and "trim" not in name:
                    again = [np.asarray(fn(*sets[i % 4])) for i in range(24)]
                    row["runs_identical"] = all(np.array_equal(a.view(np.uint16), np.asarray(
                        fn(*sets[i % 4])).view(np.uint16)) for i, a in enumerate(again[:8]))
                    row["run0_identical"] = all(np.array_equal(a.view(np.uint16), out.view(np.uint16))
                                                for a in again[::4])
                    twin = outs[name.replace("fuse=True", "fuse=False")]
                    row["ulps_vs_unfused"] = ulps_16bit(np, out, twin)
                    row["same_as_unfused"] = float(np.mean(out.view(np.uint16) == twin.view(np.uint16)))
                if name != "triton pallas_flash" and "trim" not in name:
                    fl = outs["triton pallas_flash"]
                    row["ulps_vs_triton"] = ulps_16bit(np, out, fl)
                    row["same_as_triton"] = float(np.mean(out.view(np.uint16) == fl.view(np.uint16)))
                d = grouped_span(jax, torch, fn, sets, calls=args.calls)
                row.update(us=d["span_s"] * 1e6, frac=nbytes / d["span_s"] / 1e9 / copy,
                           kernels={k: round(v * 1e6, 2) for k, v in d["top_kernels_s"].items()})
                turn_sides[f"{model} {name}"] = (fn, sets, nbytes)
            except Exception as e:  # noqa: BLE001 - a config that fails is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                print(traceback.format_exc()[-1500:], flush=True)
            print(row, flush=True)
            res["fused"][f"{model} {name}"] = row
            save()
    run_turns(args, res, jax, torch, turn_sides, copy)
    save()


def part_ship(args, res, save, jax, jnp, np, torch, randn, truth, models, S, copy):
    """Part 4: ``gqa_attention(recipe="fp32_logits", implementation=...)`` for "pallas_flash"
    and "mosaic_flash", every key visible and with ``kv_valid``: all True (the masked
    kernel: the mask fetched with each block, masked v rows zeroed) and the first half of
    the cache filled (half the keys masked, still all read). Bits against each other, the
    error against the float64 truth of the visible keys, the steps in turns."""
    from probe_mosaic_gemm import ulps_16bit

    from kernels.attention import gqa_attention

    res["ship"] = {}
    turn_sides = {}
    if args.stages:
        return ship_stages(args, res, save, jax, jnp, np, torch, randn, models, S, copy)
    for model, (N, K, H) in models.items():
        sets = step_sets(randn, N, K, H, S)
        nbytes = 2 * S * K * H * 2
        masks = {"": None, "kv_valid all": jnp.ones((1, S), bool), "kv_valid half": jnp.arange(S)[None] < S // 2}
        for mask, valid in masks.items():
            q0, k0, v0 = sets[0]
            n_vis = S if valid is None else int(valid.sum())
            want = truth(q0, k0[:, :n_vis], v0[:, :n_vis])  # both masks keep a prefix of the keys
            outs = {}
            for impl in ("pallas_flash", "mosaic_flash"):
                name = f"{model} {impl} {mask}".strip()
                fn = functools.partial(gqa_attention, recipe="fp32_logits", implementation=impl, kv_valid=valid)
                row = dict(model=model, side=name)
                try:
                    out = outs[impl] = np.asarray(fn(*sets[0]))
                    row["err_vs_f64"] = float(np.abs(out.astype(np.float64) - want).max() / np.abs(want).max())
                    if impl == "mosaic_flash":
                        fl = outs["pallas_flash"]
                        row.update(ulps_vs_triton=ulps_16bit(np, out, fl),
                                   same_as_triton=float(np.mean(out.view(np.uint16) == fl.view(np.uint16))))
                    turn_sides[name] = (fn, sets, nbytes)
                except Exception as e:  # noqa: BLE001 - a side that fails is a result too
                    row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                    print(traceback.format_exc()[-1500:], flush=True)
                print(row, flush=True)
                res["ship"][name] = row
                save()
    run_turns(args, res, jax, torch, turn_sides, copy)
    save()


def ship_stages(args, res, save, jax, jnp, np, torch, randn, models, S, copy):
    """Part 4 with ``--stages``: ``mosaic_decode`` at each stage count, every key visible and
    masked (``vis`` all True: the mask fetched with each block, the v rows zeroed), and
    masked without the zeroing (``trim="zero_v"``: what the zeroing costs), beside
    ``pallas_flash`` unmasked and with ``kv_valid`` all True, in turns."""
    import kernels.attention_mosaic as am
    from kernels.attention import gqa_attention

    turn_sides = {}
    for model, (N, K, H) in models.items():
        sets = step_sets(randn, N, K, H, S)
        nbytes = 2 * S * K * H * 2
        every = jnp.ones((1, S), bool)
        for mask, valid in (("", None), ("kv_valid all", every)):
            turn_sides[f"{model} pallas_flash {mask}".strip()] = (functools.partial(
                gqa_attention, recipe="fp32_logits", implementation="pallas_flash", kv_valid=valid), sets, nbytes)
        sp = am.default_splits(S, K, 1, block_k=am.BLOCK_K, num_sms=jax.devices()[0].core_count)
        for st in (int(x) for x in args.stages.split(",")):
            for mask, vis, trim in (("", None, ""), ("vis", every, ""), ("vis trim=zero_v", every, "zero_v")):
                turn_sides[f"{model} mosaic stages={st} {mask}".strip()] = (functools.partial(
                    lambda q, k, v, vis, **kw: am._decode(q, k, v, vis, **kw), vis=vis, scale=H ** -0.5,
                    block_k=am.BLOCK_K, num_splits=sp, stages=st, wgs=1, q_mode="rows", approx=False, trim=trim),
                    sets, nbytes)
    run_turns(args, res, jax, torch, turn_sides, copy)
    save()


def run_turns(args, res, jax, torch, turn_sides, copy):
    """Each side of ``turn_sides`` (name -> (fn, input sets, bytes read)) as one jitted
    program over its sets, compiled first, then timed in turns (``devtime.in_turns``):
    ``res["turns"][name]``, the median µs a step and its fraction of ``copy``."""
    from devtime import in_turns

    progs = {name: jax.jit(lambda ss, fn=fn: [fn(*s) for s in ss]) for name, (fn, _, _) in turn_sides.items()}
    for name, (_, ss, _) in turn_sides.items():
        jax.block_until_ready(progs[name](ss))  # compiled before the turns
    calls = {name: (functools.partial(lambda i, g, ss: g(ss), g=progs[name], ss=ss), jax.block_until_ready)
             for name, (_, ss, _) in turn_sides.items()}
    spans, kernels = in_turns(torch, calls, rounds=args.rounds, calls=args.calls)
    for name, (_, ss, nb) in turn_sides.items():
        per = [x / len(ss) for x in spans[name]]
        med = statistics.median(per)
        res["turns"][name] = dict(us_rounds=[x * 1e6 for x in per], us=med * 1e6, frac=nb / med / 1e9 / copy,
                                  kernels=kernels[name])
        print(name, res["turns"][name], flush=True)


def part_read(args, res, save, jax, jnp, np, torch, grouped_span, copy):
    """Part 0: how fast TMA reads a 7B cache (S 32768, K 4, H 128, k and v, 64 MiB) by
    layout, with nothing computed: ``head`` (one kv head's keys a program: [bk, H] boxes,
    rows K * H apart, as the decode kernel reads), ``row`` (every head of a key range a
    program: [bk, K * H] boxes, contiguous) and ``head_major`` (a [K, S, H] cache, HF's
    layout: [bk, H] boxes, contiguous)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax import lax
    from jax.experimental import pallas as pl

    S, K, H = 32768, 4, 128
    nbytes = 2 * S * K * H * 2
    res["read"] = []

    def reader(mode, bk, stages, programs):
        width = K * H if mode == "row" else H
        per_head = programs // K if mode != "row" else programs
        steps = S // (per_head * bk)

        def body(k_ref, v_ref, o_ref, kbuf, vbuf, kbar, vbar):
            p = lax.axis_index("p")
            if mode == "row":
                key0, view = p * steps * bk, lambda r, key: r.at[pl.ds(key, bk)]
            elif mode == "head":
                c, j = p % K, p // K
                key0, view = j * steps * bk, lambda r, key: r.at[pl.ds(key, bk), c]
            else:
                c, j = p % K, p // K
                key0, view = j * steps * bk, lambda r, key: r.at[c, pl.ds(key, bk)]

            def issue(i, slot):
                plgpu.copy_gmem_to_smem(view(k_ref, key0 + i * bk), kbuf.at[slot], kbar.at[slot])
                plgpu.copy_gmem_to_smem(view(v_ref, key0 + i * bk), vbuf.at[slot], vbar.at[slot])

            for i in range(stages):
                issue(i, i)

            @pl.loop(0, steps)
            def _(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(kbar.at[slot])
                plgpu.barrier_wait(vbar.at[slot])

                @pl.when(i + stages < steps)
                def _():
                    issue(i + stages, slot)

        tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((8,), jnp.float32), grid=(programs,), grid_names=("p",),
                         scratch_types=[plgpu.SMEM((stages, bk, width), jnp.bfloat16, transforms=tr),
                                         plgpu.SMEM((stages, bk, width), jnp.bfloat16, transforms=tr),
                                         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)])

        def run(k, v):
            if mode == "row":
                k, v = k.reshape(S, K * H), v.reshape(S, K * H)  # [S, K*H]: a bitcast
            elif mode == "head":
                k, v = k.reshape(S, K, H), v.reshape(S, K, H)
            else:  # the same bytes read as a [K, S, H] cache (the values do not matter here)
                k, v = k.reshape(K, S, H), v.reshape(K, S, H)
            return f(k, v)
        return run

    key = jax.random.PRNGKey(1)
    sets = [tuple(jax.random.normal(jax.random.fold_in(key, 2 * i + j), (1, S, K, H), jnp.float32).astype(jnp.bfloat16)
                  for j in range(2)) for i in range(4)]
    cfgs = []
    for mode in ("head", "row", "head_major"):
        for bk, stages in ((64, 4), (64, 6), (128, 3), (32, 8)):
            if mode == "row":
                bk, stages = max(8, bk // 4), stages  # the same bytes a box
            cfgs.append((mode, bk, stages, 128))
    cfgs += [("row", 16, 6, 256), ("head", 64, 4, 256), ("row", 32, 4, 64)]
    for mode, bk, stages, programs in cfgs:
        row = dict(mode=mode, block_k=bk, stages=stages, programs=programs)
        try:
            fn = reader(mode, bk, stages, programs)
            d = grouped_span(jax, torch, fn, sets, calls=args.calls)
            row.update(us=d["span_s"] * 1e6, frac=nbytes / d["span_s"] / 1e9 / copy)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(row, flush=True)
        res["read"].append(row)
        save()
    save()


if __name__ == "__main__":
    main()
