"""Can one kernel run both decode passes? A prototype of a fused "hf" decode step, timed.

    python3 benchmarks/probe_decode_fused.py --out $OUT/probe_decode_fused_h100.json
    .venv/bin/python benchmarks/probe_decode_fused.py --smoke --out /tmp/p.json   # interpret mode, CPU

The shipped split-key decode (``pallas_attention(decode=True)``) runs pass 1 (scores, split
max / sum) and pass 2 (global max / sum, ``p = dt(...)``, ``p @ v``) as two kernels, then
XLA sums the splits. Each pass pays a kernel's ramp and tail (a 7B step: 15.3 + 16.1 +
1.6 us against 22.2 us for its 64 MiB at copy speed).

The prototype is one pallas_call of ``2 * heads * splits`` programs. Each program takes a
work item: an A item (one split's scores) or a B item (one split's ``p @ v``). A B item
waits (spinning on an atomic counter) until every A item of its head is done, since the
hf recipe rounds ``p`` after dividing by the *global* row sum.

Deadlock: a B item waits only on A items. With ``order="ticket"`` each program takes its
item from an atomic ticket counter, so when a B item is handed out every A item of its
head has been handed out to a running program, and A items never wait: forward progress
whatever the hardware's launch order or residency. ``order="pid"`` uses the program id
(relies on in-order dispatch; here only to measure what the ticket costs).

``lag`` orders the items: the A items of ``lag`` heads first, then A and B blocks
alternate, so a head's B items can stream v while later heads' A items stream k.
``prefetch`` issues a B item's first v block before it waits.

``mode``: ``"one"`` (the design above), ``"split2"`` (the same kernel code launched twice,
A items then B items: what the code costs without the fusion) and ``"ab_same"`` (each
program does the A item and then the B item of one split, waiting in between for its
head's other splits: fast, but it needs every program of a head resident at once, which
CUDA does not promise, and it cannot run in Pallas's interpreter, where programs run one
after another). Default masks only (T = 1, every key visible), Qwen2.5-7B (N 28, K 4,
H 128, S 32768) bf16, 64 splits of 64-key blocks, 4 warps, 3 stages unless stated.

Result (H100, 2026-11-22, results/probe_decode_fused_h100.json, copy 3005 GB/s; every
output at 64 splits bit-identical to the shipped kernel):

* shipped: 32.6 us a step (scores 15.2, pv 16.1, split sum 1.9);
* ``one``, tickets: the kernel alone 36.9 us (all A items first), 37.8 (lag 1, v
  prefetched); program-id order 35.0. Slower than the two kernels it would replace;
* ``split2``: 17.3 + 17.9 us (program-id order) for what the shipped kernels do in 15.2 +
  16.1. The loads through whole-array refs at a work item's offsets (no BlockSpec: an item
  is known only at run time) cost about 2 us a pass;
* ``ab_same``: 32.1-32.5 us for the kernel, against 35.2 for the same code in two
  launches: the fusion itself saves about 3 us (the second launch's ramp, the first's
  tail). 32 splits, 128-key blocks or 2 stages were slower.

So one kernel could take about 3 us off the 32.6 (about 0.73 of copy with BlockSpec
loads), not reach 0.85: each pass streams at 0.72-0.75 of copy where a read alone of the
same size reaches 0.83-0.85 (probe_stream.py). Not shipped: the form that cannot
deadlock is slower, and the fast form can hang.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from devtime import copy_gb_s, grouped_span

    from kernels.attention_pallas import pallas_attention

    f32, bf16 = jnp.float32, jnp.bfloat16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "results": []}
    key = jax.random.PRNGKey(0)
    smoke = args.smoke

    def randn(shape, i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, f32).astype(bf16)

    if not smoke:
        import torch
    copy = 1.0 if smoke else copy_gb_s(torch, calls=args.trials)
    res["copy_gb_s"] = copy
    print(f"copy {copy:.0f} GB/s", flush=True)

    S, N, K, H = (32768 if not smoke else 2048), 28, 4, 128
    G = N // K
    R = 16
    scale = float(H ** -0.5)
    sets = [(randn((1, 1, N, H), 3 * i), randn((1, S, K, H), 3 * i + 1), randn((1, S, K, H), 3 * i + 2))
            for i in range(4)]
    nbytes = 2 * S * K * H * 2
    ref = np.asarray(pallas_attention(*sets[0], decode=True, interpret=smoke).astype(f32))

    def rnd(x):  # round to bf16, go on in f32 (the hf recipe's roundings)
        return x.astype(bf16).astype(f32)

    def fused(q, k, v, *, splits, bk, warps, stages, order, lag, prefetch, mode):
        chunk = S // splits
        steps = chunk // bk
        nh = K  # heads of the step (B = 1)
        q2 = q.reshape(N, H)  # [N, H]
        k3 = k.reshape(S, K, H)  # [S, K, H]
        v3 = v.reshape(S, K, H)  # [S, K, H]

        def item(t):
            # Item t -> (B item?, head, split). Blocks of `splits` items, in the order
            # A_0 .. A_{lag-1}, then A_{lag+i} and B_i alternating, then the remaining B blocks.
            blk, j = t // splits, t % splits
            r = blk - lag
            mid = (blk >= lag) & (blk < 2 * nh - lag)
            is_b = jnp.where(blk < lag, False, jnp.where(mid, r % 2 == 1, True))
            h = jnp.where(blk < lag, blk, jnp.where(mid, jnp.where(r % 2 == 1, r // 2, lag + r // 2), blk - nh))
            return is_b, h, j

        def kern(q_ref, k_ref, v_ref, *refs, first_item):
            s_ref, m_ref, l_ref, acc_ref, sync_ref = refs[5:]  # refs[:5]: the aliased inputs, the same buffers
            if order == "ticket":
                t = plgpu.atomic_add(sync_ref, (jnp.int32(0),), jnp.int32(1))
            else:
                t = pl.program_id(0) + first_item

            def do_a(h, j):
                base = j * chunk
                rows = jnp.arange(R) < G
                qh = plgpu.load(q_ref.at[pl.ds(h * G, R), :], mask=rows[:, None], other=0)  # [R, H]

                def step(i, carry):
                    m, l = carry
                    at = pl.multiple_of(base + i * bk, bk)
                    kb = k_ref[pl.ds(at, bk), h, :]  # [bk, H]
                    s = lax.dot_general(qh, kb, (((1,), (1,)), ((), ())), preferred_element_type=f32)  # [R, bk]
                    s = rnd(rnd(s) * jnp.float32(scale))
                    s_ref[h, :, pl.ds(at, bk)] = s.astype(bf16)  # exact: the values are on bf16's grid
                    m_new = jnp.maximum(m, jnp.max(s, axis=1))
                    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)
                    return m_new, l

                m, l = lax.fori_loop(0, steps, step, (jnp.full((R,), -jnp.inf, f32), jnp.zeros((R,), f32)))
                m_ref[h, j, :] = m
                l_ref[h, j, :] = l
                if not smoke:
                    plgpu.debug_barrier()  # every thread's stores before the release below
                plgpu.atomic_add(sync_ref, (1 + h,), jnp.int32(1))

            def do_b(h, j):
                base = j * chunk
                v0 = v_ref[pl.ds(pl.multiple_of(base, bk), bk), h, :] if prefetch else None  # [bk, H]
                zero = h * 0  # a traced 0: a literal in the loop body is a const the interpreter refuses
                # Spin until the head's A items are all done; a bound (2**20 polls) so that a probe
                # run cannot hang the GPU (had it been hit, max_abs_diff would say so).
                lax.while_loop(lambda c: (c[0] < splits) & (c[1] < (1 << 20)),
                               lambda c: (plgpu.atomic_add(sync_ref, (1 + h,), zero), c[1] + 1),
                               (plgpu.atomic_add(sync_ref, (1 + h,), zero), zero))
                if not smoke:
                    plgpu.debug_barrier()
                mj = plgpu.load(m_ref.at[h, :, :])  # [splits, R]
                lj = plgpu.load(l_ref.at[h, :, :])
                m = jnp.max(mj, axis=0)  # [R]
                l = jnp.sum(lj * jnp.exp(mj - m[None, :]), axis=0)
                inv = 1.0 / jnp.where(l == 0.0, 1.0, l)

                def step(i, acc, vb=None):
                    at = pl.multiple_of(base + i * bk, bk)
                    s = plgpu.load(s_ref.at[h, :, pl.ds(at, bk)]).astype(f32)  # [R, bk]
                    p = (jnp.exp(s - m[:, None]) * inv[:, None]).astype(bf16)
                    vb = v_ref[pl.ds(at, bk), h, :] if vb is None else vb  # [bk, H]
                    return acc + jnp.dot(p, vb, preferred_element_type=f32)  # [R, H]

                acc = jnp.zeros((R, H), f32)
                first = 0
                if prefetch:
                    acc, first = step(0, acc, v0), 1
                acc_ref[j, h, :, :] = lax.fori_loop(first, steps, step, acc)

            if mode == "ab_same":  # one program: A then B of the same split
                h, j = t // splits, t % splits
                do_a(h, j)
                do_b(h, j)
            else:
                is_b, h, j = item(t)
                lax.cond(is_b, lambda: do_b(h, j), lambda: do_a(h, j))

        n_sync = 1 + nh
        shapes = (jax.ShapeDtypeStruct((K, R, S), bf16), jax.ShapeDtypeStruct((K, splits, R), f32),
                  jax.ShapeDtypeStruct((K, splits, R), f32), jax.ShapeDtypeStruct((splits, K, R, H), f32),
                  jax.ShapeDtypeStruct((n_sync,), jnp.int32))

        def launch(bufs, first_item, n_items, name):
            return pl.pallas_call(
                functools.partial(kern, first_item=first_item),
                out_shape=shapes, grid=(n_items,),
                in_specs=[pl.no_block_spec] * 8, out_specs=[pl.no_block_spec] * 5,
                input_output_aliases={3 + i: i for i in range(5)},
                interpret=smoke,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages), name=name,
            )(q2, k3, v3, *bufs)

        bufs = tuple(jnp.zeros(x.shape, x.dtype) for x in shapes)
        n_a = nh * splits
        if mode == "one":
            bufs = launch(bufs, 0, 2 * n_a, "fused_decode")
        elif mode == "split2":  # the same code as two launches: A items, then B items
            bufs = launch(launch(bufs, 0, n_a, "fused_a"), n_a, n_a, "fused_b")
        else:  # ab_same
            bufs = launch(bufs, 0, n_a, "fused_ab")
        acc = bufs[3]
        o = jnp.sum(acc[:, :, :G, :], axis=0).astype(bf16)  # [K, G, H]
        return o.reshape(1, 1, N, H)  # [B, T, N, H]

    def time_sets(fn):
        if smoke:
            jax.block_until_ready(fn(*sets[0]))
            return {"span_s": 1.0, "top_kernels_s": {}}
        return grouped_span(jax, torch, fn, sets, calls=args.trials)

    def record(cfg, fn):
        row = dict(cfg)
        try:
            got = np.asarray(fn(*sets[0]).astype(f32))
            row["max_abs_diff"] = float(np.abs(got - ref).max())
            d = time_sets(fn)
            row.update(us=d["span_s"] * 1e6, frac=nbytes / d["span_s"] / 1e9 / copy,
                       kernels={k: round(v * 1e6, 2) for k, v in d["top_kernels_s"].items()})
        except Exception as e:  # noqa: BLE001 - a config Triton refuses is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(row, flush=True)
        res["results"].append(row)

    record({"impl": "shipped"}, functools.partial(pallas_attention, decode=True, interpret=smoke))
    base = dict(splits=64, bk=64, warps=4, stages=3, order="ticket", lag=K, prefetch=False, mode="one")
    cfgs = [base, dict(base, mode="split2"), dict(base, mode="split2", order="pid"), dict(base, mode="ab_same", order="pid"),
            dict(base, mode="ab_same", order="pid", prefetch=True), dict(base, mode="ab_same", order="pid", bk=128),
            dict(base, mode="ab_same", order="pid", splits=32), dict(base, mode="ab_same", order="pid", stages=2),
            dict(base, order="pid"), dict(base, lag=1, prefetch=True)]
    if smoke:  # S = 2048: 16 splits of two 64-key blocks. Not "ab_same": its waits cannot be met in the
        # interpreter (each gives up after 2**20 polls, with wrong numbers)
        cfgs = [dict(c, splits=16) for c in cfgs if c["bk"] == 64 and c["mode"] != "ab_same"]
    for c in cfgs:
        record(dict(impl="fused", **c), functools.partial(fused, **c))

    ok = sorted((r for r in res["results"] if "us" in r), key=lambda r: r["us"])
    res["best"] = ok[:5]
    print(json.dumps(res["best"], indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
