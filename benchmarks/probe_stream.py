"""Why does each decode pass stream at ~0.66 of copy? Read-only kernels and decode layouts, one run.

    python3 benchmarks/probe_stream.py --out $OUT/probe_stream_h100.json [--what stream,decode,rms_norm]
    python3 benchmarks/probe_stream.py --what rms_norm --rounds 4 --rms-grid focus --out $OUT/probe_stream_rms_session8_h100.json

Every time is a device span (``devtime``: CUPTI, first kernel start to last kernel end),
against the copy rate measured in the same run (torch ``dst.copy_(src)`` of 1 GiB).

* ``stream``: a 32 MiB bf16 array ``[32768, 512]`` (one 7B decode step's k: S = 32768,
  K x H = 4 x 128) read once by a Pallas kernel of P programs, each summing its rows in
  blocks of ``bk`` rows: by an f32 row sum (``sum``) or through ``tl.dot`` with a ones
  matrix (``dot``: Triton pipelines the loads that feed a dot through shared memory).
  Peers: XLA's column sum of the same array. This separates what the memory system
  gives a Pallas loop of this shape from what the decode arithmetic costs.
* ``decode``: the shipped split-key kernel (``pallas_attention(decode=True)``) against a
  per-kv-head layout: grid (K, splits), each program holds its head's G query rows
  (padded to 16 by a masked load) and walks only that head's keys, and pass 2 combines
  its head's per-split max / sum itself. Default masks only (T = 1, every key visible),
  the "hf" recipe; max |diff| against the shipped kernel. (The committed results predate
  the change: "shipped" there is the old layout, all N * T rows in each program. The
  kernel has shipped the per-head layout since, so a new run compares it with its
  mask-free prototype.)
* ``rms_norm``: the shipped whole-row kernel against a persistent grid (P programs, each
  looping over rows P apart) for Qwen2.5-7B ``x[4096, 3584]``.

``--smoke`` runs one config of each on small shapes in interpret mode (no timing): a
check of the script on any machine.

Result (H100, 2026-11-22, results/probe_stream_h100.json, copy 3005 GB/s; the 1024-program
rows with ``bk`` 64 are void: a program's 32 rows are fewer than one block):

* reading alone peaks at 0.85 of copy (13.2 us for 32 MiB: 256 programs, 32-row blocks,
  8 warps, f32 row sum); XLA's column sum of the same array reads at 0.75. At 128
  programs the row-sum loop is 0.62-0.74; feeding the loads to a dot (so Triton pipelines
  them) brings 128 programs to 0.80-0.83;
* decode: the shipped kernel (all 28 rows in each program) took 34.7 us a step
  (scores 16.9, pv 16.7, split sum 2.1); one kv head a program, 64 splits, block_k 64,
  4 warps, 3 stages: 32.8 us (15.7 + 16.1 + 2.0), the same outputs. The kernel now ships
  that layout;
* rms_norm: no persistent grid beat the shipped launch (21.0 us at best, 1056 programs of
  2 rows, against 21.1 for 1 row a program); the shipped 1 row, 8 warps took 21.14 us
  and 2 rows, 8 warps 21.29.

Session 8 (results/probe_stream_rms_session8_h100.json, ``--what rms_norm --rounds 4
--rms-grid focus``, copy 3010 GB/s): the configs in turns, four rounds, medians. Shipped
21.06 us (0.927 of copy); the best persistent grid, 1056 programs of 2 rows, 21.05
(0.927); 2112 programs of 1 row 21.11; ``x + 1`` 21.31 (0.916). Each config's four rounds
lie within 0.1 us. None reaches 0.93 (20.97 us at this copy rate).
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
    ap.add_argument("--what", default="stream,decode,rms_norm")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="rms_norm: repeat the configs in turns (run-to-run spread)")
    ap.add_argument("--rms-grid", choices=("full", "focus"), default="full",
                    help="rms_norm: every persistent config, or the few near the shipped launch (with --rounds)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, interpret mode, no timing (any machine)")
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
    from kernels.rms_norm_pallas import pallas_rms_norm

    f32, bf16 = jnp.float32, jnp.bfloat16
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "results": {}}
    key = jax.random.PRNGKey(0)

    def randn(shape, i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, f32).astype(bf16)

    if not args.smoke:
        import torch

    def time_sets(fn, sets):
        if args.smoke:
            jax.block_until_ready(fn(*sets[0]))
            return {"span_s": 1.0, "top_kernels_s": {}}
        return grouped_span(jax, torch, fn, sets, calls=args.trials)

    copy = 1.0 if args.smoke else copy_gb_s(torch, calls=args.trials)
    res["copy_gb_s"] = copy
    print(f"copy {copy:.0f} GB/s", flush=True)

    def record(name, cfg, nbytes, fn, sets, ref=None):
        row = dict(cfg)
        try:
            if ref is not None:
                got = np.asarray(fn(*sets[0]).astype(f32))
                row["max_abs_diff"] = float(np.abs(got - ref).max())
            d = time_sets(fn, sets)
            row.update(us=d["span_s"] * 1e6, frac=nbytes / d["span_s"] / 1e9 / copy,
                       kernels={k: round(v * 1e6, 2) for k, v in d["top_kernels_s"].items()})
        except Exception as e:  # noqa: BLE001 - a config Triton refuses is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, row, flush=True)
        res["results"].setdefault(name, []).append(row)

    what = args.what.split(",")

    # ------------------------------------------------------------------ stream
    if "stream" in what:
        S, C = (32768, 512) if not args.smoke else (2048, 512)
        sets = [(randn((S, C), i),) for i in range(4)]
        nbytes = S * C * 2
        record("stream", {"impl": "xla column sum"}, nbytes, lambda x: jnp.sum(x.astype(f32), axis=0), sets)

        def stream(x, *, programs, bk, warps, stages, use_dot):
            chunk = S // programs
            steps = chunk // bk

            def kern(x_ref, o_ref):
                def step(i, acc):
                    blk = x_ref[pl.ds(pl.multiple_of(i * bk, bk), bk), :]  # [bk, C] bf16
                    if use_dot:
                        return acc + jnp.dot(jnp.ones((16, bk), bf16), blk, preferred_element_type=f32)  # [16, C]
                    return acc + jnp.sum(blk.astype(f32), axis=0)  # [C]
                acc = lax.fori_loop(0, steps, step, jnp.zeros((16, C) if use_dot else (C,), f32))
                o_ref[...] = jnp.sum(acc, axis=0) if use_dot else acc

            return pl.pallas_call(
                kern, out_shape=jax.ShapeDtypeStruct((programs, C), f32), grid=(programs,),
                in_specs=[pl.BlockSpec((chunk, C), lambda j: (j, 0))],
                out_specs=pl.BlockSpec((pl.squeezed, C), lambda j: (j, 0)),
                interpret=args.smoke,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages), name="stream")(x)

        grid = [dict(use_dot=u, programs=p, bk=b, warps=w, stages=st) for u in (False, True)
                for p in (128, 256, 512, 1024) for b in (16, 32, 64) for w, st in ((4, 1), (4, 3), (8, 3))]
        for cfg in (grid[:1] + grid[-1:] if args.smoke else grid):
            record("stream", cfg, nbytes, functools.partial(stream, **cfg), sets)

    # ------------------------------------------------------------------ decode
    if "decode" in what:
        S, N, K, H = (32768 if not args.smoke else 4096), 28, 4, 128
        G = N // K
        R = 16  # a head's G rows padded for tl.dot (M >= 16)
        scale = float(H ** -0.5)
        sets = [(randn((1, 1, N, H), 3 * i), randn((1, S, K, H), 3 * i + 1), randn((1, S, K, H), 3 * i + 2))
                for i in range(4)]
        nbytes = 2 * S * K * H * 2
        ref = np.asarray(pallas_attention(*sets[0], decode=True, interpret=args.smoke).astype(f32))
        shipped = functools.partial(pallas_attention, decode=True, interpret=args.smoke)
        record("decode", {"impl": "shipped"}, nbytes, shipped, sets, ref)

        def rnd(x):  # round to bf16, go on in f32 (the hf recipe's roundings)
            return x.astype(bf16).astype(f32)

        def per_head(q, k, v, *, splits, bk, warps, stages, stages2):
            chunk = S // splits
            steps = chunk // bk
            q2 = q.reshape(N, H)  # [N, H]
            k3 = k.reshape(S, K, H)  # [S, K, H]
            v3 = v.reshape(S, K, H)  # [S, K, H]
            sq = pl.squeezed

            def p1(q_ref, k_ref, s_ref, m_ref, l_ref):
                h = pl.program_id(0)
                rows = jnp.arange(R) < G
                qh = plgpu.load(q_ref.at[pl.ds(h * G, R), :], mask=rows[:, None], other=0)  # [R, H]

                def step(i, carry):
                    m, l = carry
                    local = pl.multiple_of(i * bk, bk)
                    kb = k_ref[pl.ds(local, bk), :]  # [bk, H]
                    s = lax.dot_general(qh, kb, (((1,), (1,)), ((), ())), preferred_element_type=f32)  # [R, bk]
                    s = rnd(rnd(s) * jnp.float32(scale))
                    s_ref[:, pl.ds(local, bk)] = s.astype(bf16)
                    m_new = jnp.maximum(m, jnp.max(s, axis=1))
                    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)
                    return m_new, l

                m, l = lax.fori_loop(0, steps, step, (jnp.full((R,), -jnp.inf, f32), jnp.zeros((R,), f32)))
                m_ref[...] = m
                l_ref[...] = l

            part = pl.BlockSpec((sq, sq, R), lambda h, j: (h, j, 0))
            sc, mp, lp = pl.pallas_call(
                p1, out_shape=(jax.ShapeDtypeStruct((K, R, S), bf16), jax.ShapeDtypeStruct((K, splits, R), f32),
                               jax.ShapeDtypeStruct((K, splits, R), f32)),
                grid=(K, splits),
                in_specs=[pl.no_block_spec, pl.BlockSpec((chunk, sq, H), lambda h, j: (j, h, 0))],
                out_specs=(pl.BlockSpec((sq, R, chunk), lambda h, j: (h, 0, j)), part, part),
                interpret=args.smoke,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages), name="ph_scores",
            )(q2, k3)

            def p2(s_ref, v_ref, m_ref, l_ref, o_ref):
                mj = m_ref[...]  # [splits, R]
                m = jnp.max(mj, axis=0)  # [R]
                l = jnp.sum(l_ref[...] * jnp.exp(mj - m[None, :]), axis=0)
                inv = 1.0 / jnp.where(l == 0.0, 1.0, l)

                def step(i, acc):
                    local = pl.multiple_of(i * bk, bk)
                    s = s_ref[:, pl.ds(local, bk)].astype(f32)  # [R, bk]
                    p = (jnp.exp(s - m[:, None]) * inv[:, None]).astype(bf16)
                    return acc + jnp.dot(p, v_ref[pl.ds(local, bk), :], preferred_element_type=f32)  # [R, H]

                o_ref[...] = lax.fori_loop(0, steps, step, jnp.zeros((R, H), f32))

            whole = pl.BlockSpec((sq, splits, R), lambda h, j: (h, 0, 0))
            acc = pl.pallas_call(
                p2, out_shape=jax.ShapeDtypeStruct((splits, K, R, H), f32), grid=(K, splits),
                in_specs=[pl.BlockSpec((sq, R, chunk), lambda h, j: (h, 0, j)),
                          pl.BlockSpec((chunk, sq, H), lambda h, j: (j, h, 0)), whole, whole],
                out_specs=pl.BlockSpec((sq, sq, R, H), lambda h, j: (j, h, 0, 0)),
                interpret=args.smoke,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages2), name="ph_pv",
            )(sc, v3, mp, lp)  # [splits, K, R, H]
            o = jnp.sum(acc[:, :, :G, :], axis=0).astype(bf16)  # [K, G, H]
            return o.reshape(1, 1, N, H)  # [B, T, N, H]

        grid = [dict(splits=sp, bk=b, warps=w, stages=st, stages2=st2) for sp in (32, 64, 128)
                for b in (32, 64, 128) for w, st, st2 in ((4, 2, 2), (4, 3, 3), (4, 4, 4), (8, 3, 3), (4, 1, 1))]
        for c in (grid[:1] if args.smoke else grid):
            record("decode", dict(impl="per_head", **c), nbytes, functools.partial(per_head, **c), sets, ref)

    # ------------------------------------------------------------------ rms_norm
    if "rms_norm" in what:
        T, D = (4096 if not args.smoke else 64), 3584
        Dp = 4096
        sets = [(randn((T, D), 100 + i), randn((D,), 200 + i)) for i in range(5)]
        nbytes = 2 * T * D * 2 + D * 2
        ref = np.asarray(pallas_rms_norm(*sets[0], interpret=args.smoke).astype(f32))

        def persistent(x, w, *, programs, br, warps, evict):
            iters = -(-T // (programs * br))

            def kern(x_ref, w_ref, o_ref):
                pid = pl.program_id(0)
                cols = jnp.arange(Dp)
                wv = plgpu.load(w_ref.at[pl.ds(0, Dp)], mask=cols < D, other=0).astype(f32)

                def step(i, c):
                    first = (i * programs + pid) * br
                    ok = ((first + jnp.arange(br)) < T)[:, None] & (cols < D)[None, :]
                    xb = plgpu.load(x_ref.at[pl.ds(first, br), pl.ds(0, Dp)], mask=ok, other=0,
                                    eviction_policy=evict).astype(f32)  # [br, Dp]
                    r = lax.rsqrt(jnp.sum(xb * xb, axis=1, keepdims=True) / jnp.float32(D) + 1e-6)
                    y = (wv[None, :].astype(bf16) * (xb * r).astype(bf16)).astype(bf16)
                    plgpu.store(o_ref.at[pl.ds(first, br), pl.ds(0, Dp)], y, mask=ok)
                    return c

                lax.fori_loop(0, iters, step, 0)

            return pl.pallas_call(
                kern, out_shape=jax.ShapeDtypeStruct((T, D), bf16), grid=(programs,),
                in_specs=[pl.no_block_spec, pl.no_block_spec], out_specs=pl.no_block_spec,
                interpret=args.smoke,
                compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1), name="rms_persistent")(x, w)

        def shipped(br, w):
            return functools.partial(pallas_rms_norm, block_rows=br, num_warps=w, interpret=args.smoke)

        if args.rms_grid == "full":
            grid = [dict(programs=p, br=b, warps=w, evict=e) for p in (132, 264, 528, 1056)
                    for b, w in ((1, 8), (2, 8), (1, 4)) for e in (None, "evict_first")]
            shipped_cfgs = ((1, 8), (2, 8), (1, 4), (2, 4))
        else:  # the shipped launch against the full grid's best persistent rows (1056 x 2) and neighbours
            grid = [dict(programs=p, br=b, warps=8, evict=None) for p, b in ((1056, 2), (1056, 1), (1584, 1),
                                                                              (2112, 1), (2112, 2))]
            shipped_cfgs = ((1, 8),)
        for turn in range(args.rounds):
            for br, w in shipped_cfgs:
                record("rms_norm", dict(impl="shipped", block_rows=br, num_warps=w, round=turn), nbytes,
                       shipped(br, w), sets, ref)
            record("rms_norm", {"impl": "x + 1", "round": turn}, nbytes, lambda x, w: x + 1, sets)
            for c in (grid[:1] if args.smoke else grid):
                record("rms_norm", dict(impl="persistent", round=turn, **c), nbytes,
                       functools.partial(persistent, **c), sets, ref)

    for name, rows in res["results"].items():
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        res.setdefault("best", {})[name] = ok[:5]
    print(json.dumps(res["best"], indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
