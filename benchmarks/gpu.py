"""GPU benchmark: each JAX kernel's achieved bandwidth / FLOP rate against the device's
ceilings and against its PyTorch / JAX peers, all measured in one run.

    PYTHONPATH=. python3 benchmarks/gpu.py --out $OUT/h100.json        # the GPU run
    .venv/bin/python benchmarks/gpu.py --smoke --out /tmp/bench.json   # CPU check, tiny shapes
    .venv/bin/python benchmarks/gpu.py --markdown benchmarks/results/h100.json   # README tables

Method (see benchmarks/README.md and /work/.library/device/METHOD.md):

* Ceilings, measured in the same run with torch: the copy bandwidth (``dst.copy_(src)``
  of a 1 GiB buffer, counting bytes read + written = 2 GiB a copy) and the bf16 matmul
  rate (``torch.matmul`` 8192^3 on random data, 2*8192^3 FLOPs). Both are measured again
  at the end (``ceilings_end``) to show drift (clocks, throttling).
* Timing, the same method on every side: the device's own clock. After the warm-up
  (the compile), ``--device-calls`` (5) calls run under torch.profiler's CUPTI kernel
  trace, which records every kernel of the process (JAX's included), each call followed
  by a synchronize and a 2 ms pause; ``time_s`` is the median over calls of the call's
  *span* (first kernel start to last kernel end: the gaps between a call's own kernels
  count, the host's dispatch before the first does not), divided by the applications in
  the call. ``device`` in each entry also holds the kernels per application, their summed
  durations (``busy_s``) and the largest kernels by name.
* Beside it, the host-pipelined time (``time_s_pipelined``): enqueue ``iters`` calls back to
  back and wait once (JAX keeps at most 8 calls in flight), host clock over the loop,
  median of ``--repeats`` (5) timings of >= ``--target-ms`` (50 ms) each; torch loops are
  also bracketed by CUDA events (``time_s_events``). It was the measurement of record
  until session 5, when CUPTI showed it is bound by the host for JAX programs of short
  kernels: XLA's runtime spends ~10-20 us of host time a kernel launch, so a program of
  5 x 21 us rms_norm kernels read 24.7 us a kernel pipelined against 21.0 us on the
  device, and the 0.5B rms_norm (6.3 us on the device) read 11-19 us
  (benchmarks/results/probe_timing_h100.json). With no CUDA device (``--smoke`` on a
  CPU) the pipelined time is the only one.
* JAX calls of memory-bound kernels are grouped: one jitted program applies the kernel
  to each of ``n_sets`` independent input sets (one dispatch, ``n_sets`` applications;
  time per application = span / n_sets). torch calls rotate over the same ``n_sets`` sets
  one call at a time; the "CUDA graph" rows replay all sets in one graph.
* Working set: ``n_sets = ceil(max(256 MiB, 5 x L2) / bytes of one call)`` (at most 12),
  so that each call reads inputs that are not in the 50 MB L2 (the previous use of a set
  was ``n_sets - 1`` calls ago, more than L2's worth of traffic in between). Inputs are
  random normal bf16 (never zeros).
* ``lm_head_vs_cublas`` comes from a second timing of the sides in turns (ours, cuBLAS,
  ours, ... ``--lm-head-turns`` (7) each, ``res["lm_head_turns"]``): a 6 ms GEMM at the
  power limit drifts by 5-10% over a run, which timed apart decides a ratio of about 1
  by where each side fell (1.043, 0.980 and 1.062 in three runs). Each side runs with the
  weight ``[D, V]`` and ``[V, D]``; the ratio is ours as the Qwen2 model calls it
  (``w_layout="VD"``, HF's layout) against the faster torch layout.
* Every implementation's output (set 0) is compared with the transformers eager peer's
  output on the same inputs: ``rel_err = ||out - ref|| / ||ref||`` in float32
  (a sanity check that each side computes the same function, not a parity test).

Bytes and FLOPs (bf16 = 2 bytes; B=1; formulas are the minimum traffic: each input read
once, each output written once):

  rms_norm     x[T,D], w[D]:   bytes = 2*T*D*2 (read x, write y) + D*2 (weight)
  apply_rope   q[B,T,N,H], k[B,T,K,H], cos/sin[B,T,H] (HF's apply_rotary_pos_emb rotates
               q and k together; so does our measurement: apply_rope_qk, or two apply_rope calls):
               bytes = 2*(T*N*H + T*K*H)*2 (read + write q and k) + 2*T*H*2 (cos, sin)
  swiglu_act   g[T,F], u[T,F] -> silu(g)*u:  bytes = 3*T*F*2
  softmax      x[B,N,T,T] bf16, f32 inside:   bytes = 2*N*T*T*2 (read x, write p)
  attention_prefill (causal, S=T): flops = 4*B*N*T*S*H/2 (QK^T and PV, half the
               matrix visible); bytes = (2*T*N*H + 2*S*K*H)*2 (q, out, k, v)
  attention_decode  (T=1, S keys all visible): bytes = 2*B*S*K*H*2 (the K and V caches
               read once; q and out are negligible); flops = 4*B*N*S*H
  lm_head      h[T,D] @ w[D,V] (or w[V,D]^T): flops = 2*T*D*V; bytes = T*D*2 + D*V*2 + T*V*(4 | 2)
  linear       x[T,I] @ w[I,O] (+ b[O]): flops = 2*T*I*O; bytes = (T*I + I*O + T*O (+O))*2

``frac`` is achieved GB/s over the measured copy bandwidth for memory-bound ops, and
achieved TFLOP/s over the measured bf16 matmul rate for matmul-bound ones; ``floor_s``
= max(bytes / copy bandwidth, flops / matmul rate), the time no version beats by much.

Peers: transformers' eager ops (Qwen2RMSNorm, apply_rotary_pos_emb, Qwen2MLP's
act_fn(g)*u, softmax(dtype=f32).to(bf16), eager_attention_forward with repeat_kv);
torch.compile (mode default, dynamic=False) of the same; torch SDPA with the flash (and
cuDNN) backend forced and enable_gqa=True; jax.nn.dot_product_attention with
implementation "xla" and "cudnn" (native GQA: k/v with K < N heads); torch bf16 cuBLAS
for lm_head (``torch.matmul`` on w[D,V] and ``F.linear`` on w[V,D], ours in both layouts too)
and F.linear for linear. The eager and torch.compile peers of the memory-bound ops are
also timed as one CUDA graph over all input sets (rows "..., CUDA graph"), the torch
twin of the grouped JAX program: eager torch pays a host launch per kernel, which at the
0.5B shapes can exceed the kernels' own time, and a call alone on an idle GPU can end
before its writes leave L2 (probe_peer_timing.py), which back to back they cannot. Anything that cannot run is recorded with
status "skipped" (not applicable here, e.g. cuDNN on a CPU) or "failed" (it raised),
and a reason; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

T0 = time.monotonic()  # the budget counts from here: imports of torch/jax/transformers included
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "h100.json"
BF = 2  # bytes per bf16 element
EPS = 1e-6
THETA = 1_000_000.0  # Qwen2.5's rope_theta

SUMMARY_KEYS = ("rms_norm_bw_frac", "apply_rope_bw_frac", "swiglu_bw_frac", "softmax_bw_frac", "decode_bw_frac",
                "attention_vs_sdpa", "attention_hf_vs_sdpa", "lm_head_vs_cublas")


@dataclass(frozen=True)
class Model:
    name: str
    N: int
    K: int
    H: int
    D: int
    F: int
    V: int
    T: int  # prefill length
    S: int  # decode: keys in the cache


def models(smoke: bool) -> list[Model]:
    if smoke:  # tiny shapes with the same head ratios; names kept so the summary logic runs
        return [Model("7b", 4, 2, 16, 64, 128, 256, 32, 64), Model("0.5b", 2, 1, 8, 32, 64, 128, 16, 32)]
    return [Model("7b", 28, 4, 128, 3584, 18944, 152064, 4096, 32768),
            Model("0.5b", 14, 2, 64, 896, 4864, 151936, 4096, 32768)]


# ------------------------------------------------------------------------------------
# Rendering (needs neither jax nor torch: --markdown works anywhere)
# ------------------------------------------------------------------------------------

def _fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def render_markdown(res: dict, *, summary_last: bool = False, compact: bool = False) -> str:
    """Header, summary table and per-measurement table (README-ready markdown).

    ``compact`` (the end of a run's stdout, whose last 12k characters are all that a lent
    machine's reply carries): shorter reasons and notes, the summary last."""
    wr, wn = (30, 72) if compact else (64, 110)
    head, summary, table = [], [], []
    dev = res.get("device", {})
    ver = res.get("versions", {})
    ceil = res.get("ceilings", {})
    cend = res.get("ceilings_end", {})
    head.append(f"Device: {dev.get('name', '?')} ({dev.get('platform', '?')}); "
                + ", ".join(f"{k} {v}" for k, v in ver.items()) + (" -- SMOKE (tiny shapes)" if res.get("smoke") else ""))
    cp, mm = ceil.get("copy", {}), ceil.get("matmul", {})
    head.append(f"Ceilings: copy {_fmt(cp.get('gbps'))} GB/s (read+write), bf16 matmul {_fmt(mm.get('tflops'))} TFLOP/s"
                + (f"; at the end: copy {_fmt(cend.get('copy', {}).get('gbps'))} GB/s, "
                   f"matmul {_fmt(cend.get('matmul', {}).get('tflops'))} TFLOP/s" if cend else "")
                + (f". Run took {res['elapsed_s']:.0f} s." if res.get("elapsed_s") else ""))
    summary.append("| summary | value | note |")
    summary.append("| --- | --- | --- |")
    notes = res.get("summary_notes", {})
    for k in SUMMARY_KEYS:
        v = res.get("summary", {}).get(k)
        summary.append(f"| {k} | {'null' if v is None else f'{v:.3f}'} | {str(notes.get(k, ''))[:wn]} |")
    table.append("| model | op | implementation | time (device) | pipelined | GB/s | TFLOP/s | frac | rel_err | status |")
    table.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in res.get("entries", []):
        st = e.get("status", "?")
        if st != "ok":
            why = str(e.get("reason", ""))
            st = (why if why.startswith(st) else f"{st}: {why}")[:wr]
        re_ = e.get("rel_err")
        table.append(f"| {e.get('model', '')} | {e.get('op', '')} | {e.get('impl', '')} | {_fmt_time(e.get('time_s'))} "
                     f"| {_fmt_time(e.get('time_s_pipelined'))} "
                     f"| {_fmt(e.get('gbps'), 0)} | {_fmt(e.get('tflops'))} | {_fmt(e.get('frac'), 3)} "
                     f"| {'-' if re_ is None else f'{re_:.1e}'} | {st} |")
    parts = [head, table, summary] if summary_last else [head, summary, table]
    return "\n\n".join("\n".join(x) for x in parts)


def write_json(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import torch

        self.jax, self.jnp, self.torch = jax, jnp, torch
        self.args = args
        self.t_start = T0
        self.cuda = torch.cuda.is_available()
        self.tdev = torch.device("cuda" if self.cuda else "cpu")
        self.jplat = jax.devices()[0].platform
        self.on_gpu = self.cuda and self.jplat == "gpu"
        self.repeats = args.repeats or (2 if args.smoke else 5)
        self.target_s = (args.target_ms or (2.0 if args.smoke else 50.0)) / 1e3
        l2 = torch.cuda.get_device_properties(0).L2_cache_size if self.cuda and hasattr(
            torch.cuda.get_device_properties(0), "L2_cache_size") else 50 << 20
        self.ws_target = (1 << 20) if args.smoke else max(256 << 20, 5 * l2)
        self.max_sets = 2 if args.smoke else 12
        self.key = jax.random.key(0) if hasattr(jax.random, "key") else jax.random.PRNGKey(0)
        self.counter = 0
        env = {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                               "XLA_FLAGS", "CUDA_VISIBLE_DEVICES") if os.environ.get(k) is not None}
        self.res = {"smoke": bool(args.smoke), "argv": sys.argv[1:], "env": env, "device": self.device_info(),
                    "versions": self.versions(), "method": __doc__.split("Bytes and FLOPs")[0].strip(),
                    "ceilings": {}, "entries": [], "summary": {}, "summary_notes": {}}
        self.out = Path(args.out)
        extra = os.environ.get("OUT")
        self.out_copy = Path(extra) / self.out.name if extra and Path(extra).is_dir() and \
            Path(extra).resolve() != self.out.parent.resolve() else None

    # --- bookkeeping ---------------------------------------------------------------
    def device_info(self):
        torch, jax = self.torch, self.jax
        d = {"platform": f"torch {self.tdev.type}, jax {self.jplat}", "jax_device": str(jax.devices()[0]),
             "jax_device_kind": getattr(jax.devices()[0], "device_kind", "?"), "host": platform.node(),
             "python": sys.version.split()[0]}
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            d.update(name=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                     total_memory_gib=round(p.total_memory / 2**30, 1),
                     l2_cache_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1) or None)
        else:
            d["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        return d

    def versions(self):
        v = {"jax": self.jax.__version__, "torch": self.torch.__version__}
        for name in ("jaxlib", "transformers", "triton"):
            try:
                v[name] = __import__(name).__version__
            except Exception as e:  # noqa: BLE001
                v[name] = f"unavailable ({type(e).__name__})"
        return v

    def elapsed(self):
        return time.monotonic() - self.t_start

    def save(self):
        write_json(self.res, self.out)
        if self.out_copy:
            write_json(self.res, self.out_copy)

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    # --- data -------------------------------------------------------------------------
    def randn(self, shape, scale=1.0):
        jax, jnp = self.jax, self.jnp
        self.counter += 1
        x = jax.random.normal(jax.random.fold_in(self.key, self.counter), shape, jnp.float32) * scale
        return x.astype(jnp.bfloat16)

    def n_sets(self, nbytes):
        return max(1, min(self.max_sets, math.ceil(self.ws_target / max(nbytes, 1))))

    def t(self, x):
        """A JAX array as a torch tensor on torch's device (dlpack; host copy as fallback)."""
        torch = self.torch
        self.jax.block_until_ready(x)
        try:
            y = torch.from_dlpack(x)
            if y.device.type != self.tdev.type:
                raise RuntimeError("device mismatch")
            return y
        except Exception:  # noqa: BLE001
            import numpy as np
            a = np.asarray(x)
            if a.dtype.name == "bfloat16":
                return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16).to(self.tdev)
            return torch.from_numpy(a.copy()).to(self.tdev)

    def rel_err(self, outs, refs):
        torch = self.torch
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        refs = refs if isinstance(refs, (tuple, list)) else [refs]
        num = den = 0.0
        for o, r in zip(outs, refs):
            o = o if isinstance(o, torch.Tensor) else self.t(o)
            o, r = o.float(), r.float()
            if o.shape != r.shape:
                raise ValueError(f"shape {tuple(o.shape)} vs reference {tuple(r.shape)}")
            num += float(torch.linalg.vector_norm(o - r)) ** 2
            den += float(torch.linalg.vector_norm(r)) ** 2
        return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")

    # --- timing ---------------------------------------------------------------------
    def _timeit(self, call, sync, group, events=False, depth=None):
        """Median seconds per kernel application: warm-up, size iters, repeats.

        ``depth`` (JAX): at most this many results are kept in flight; before enqueueing
        one more, wait for the one ``depth`` calls back. The queue never drains (no
        bubble), and memory stays bounded whether or not the runtime frees the buffers of
        pending calls early (7B softmax writes 0.94 GB a call)."""
        out = call(0)
        sync(out)
        out0 = out
        probe_n = 2
        t0 = time.perf_counter()
        for i in range(probe_n):
            out = call(i + 1)
        sync(out)
        per_call = max((time.perf_counter() - t0) / probe_n, 1e-7)
        iters = int(min(2000, max(2, math.ceil(self.target_s / per_call))))
        times, ev_times = [], []
        torch = self.torch
        for _ in range(self.repeats):
            sync(None)
            if events:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            if depth:
                pending = collections.deque()
                for i in range(iters):
                    if len(pending) >= depth:
                        sync(pending.popleft())
                    out = call(i)
                    pending.append(out)
                pending.clear()
            else:
                for i in range(iters):
                    out = call(i)
            if events:
                e1.record()
            sync(out)
            times.append((time.perf_counter() - t0) / (iters * group))
            if events:
                ev_times.append(e0.elapsed_time(e1) / 1e3 / (iters * group))
        del out
        return dict(time_s=statistics.median(times), times_s=times, iters=iters,
                    time_s_events=statistics.median(ev_times) if ev_times else None), out0

    def device_span(self, call, sync, group):
        """Device seconds per application from CUPTI (``devtime.device_span``); None without CUDA."""
        if not self.cuda:
            return None
        from devtime import device_span

        return device_span(self.torch, call, sync, group, calls=self.args.device_calls)

    def _apply_timing(self, e, stats, dev):
        """``time_s`` = the device span when CUPTI measured one, else the pipelined time."""
        e.update(stats)
        e["time_s_pipelined"] = stats["time_s"]
        if dev is not None:
            e["device"] = dev
            if dev.get("span_s"):
                e["time_s"] = dev["span_s"]
                e["timing_primary"] = "device span (CUPTI)"
                return
        e["timing_primary"] = "host pipelined"

    def _entry(self, spec, impl, side, **kw):
        e = {"name": f"{spec['model']}/{spec['op']}/{impl}", "op": spec["op"], "model": spec["model"], "impl": impl,
             "side": side, "shape": spec["shape"],
             "bytes": spec.get("bytes"), "flops": spec.get("flops"), "bound": spec["bound"]}
        e.update(kw)
        return e

    def _finish(self, e):
        ceil = self.res["ceilings"]
        bw = ceil.get("copy", {}).get("gbps")
        rate = ceil.get("matmul", {}).get("tflops")
        t = e.get("time_s")
        if t:
            if e.get("bytes"):
                e["gbps"] = e["bytes"] / t / 1e9
            if e.get("flops"):
                e["tflops"] = e["flops"] / t / 1e12
            if e["bound"] == "memory" and bw and e.get("gbps"):
                e["frac"] = e["gbps"] / bw
            elif e["bound"] == "compute" and rate and e.get("tflops"):
                e["frac"] = e["tflops"] / rate
            floors = []
            if bw and e.get("bytes"):
                floors.append(e["bytes"] / (bw * 1e9))
            if rate and e.get("flops"):
                floors.append(e["flops"] / (rate * 1e12))
            if floors:
                e["floor_s"] = max(floors)
        self.res["entries"].append(e)
        self.save()
        rel = e.get("rel_err")
        msg = (f"[{self.elapsed():6.1f}s] {e['model']:>5} {e['op']:<18} {e['impl']:<44} "
               + (f"{_fmt_time(t):>11}  {_fmt(e.get('gbps'), 0):>6} GB/s  {_fmt(e.get('tflops'))} TFLOP/s  "
                  f"frac {_fmt(e.get('frac'), 3)}  rel_err {'-' if rel is None else f'{rel:.1e}'}"
                  if e["status"] == "ok" else f"{e['status']}: {str(e.get('reason'))[:160]}"))
        print(msg, flush=True)
        return e

    def _skip_reason(self, phase):
        limit = self.args.budget_s - (45 if phase == "compile" else 0)
        if self.elapsed() > limit:
            return f"skipped: time budget ({self.elapsed():.0f} s elapsed > {limit:.0f} s; --budget-s)"
        return None

    def skip(self, spec, impl, side, reason):
        return self._finish(self._entry(spec, impl, side, status="skipped", reason=reason))

    def run_jax(self, spec, impl, fn, sets, *, ref=None, to_common=None, side="ours", phase="main",
                needs_gpu=None, extra=None):
        """Time ``fn(*set)`` over all ``sets`` in ONE jitted program (grouped dispatch)."""
        jax = self.jax
        r = self._skip_reason(phase)
        if r:
            return self.skip(spec, impl, side, r), None
        if needs_gpu and not self.on_gpu:
            return self.skip(spec, impl, side, f"skipped: {needs_gpu} needs a CUDA GPU (jax backend {self.jplat})"), None
        e = self._entry(spec, impl, side, n_sets=len(sets), timing="jax: grouped jit, block_until_ready once",
                        **(extra or {}))
        out0 = None
        try:
            g = jax.jit(lambda ss: tuple(fn(*s) for s in ss))
            tsets = tuple(tuple(s) for s in sets)
            t_c = time.perf_counter()
            jax.block_until_ready(g(tsets))
            e["compile_s"] = time.perf_counter() - t_c
            sync = lambda o: o is not None and jax.block_until_ready(o)  # noqa: E731
            stats, outs = self._timeit(lambda i: g(tsets), sync, group=len(sets), depth=8)
            self._apply_timing(e, stats, self.device_span(lambda i: g(tsets), sync, len(sets)))
            out0 = outs[0]
            e["status"] = "ok"
        except Exception as ex:  # noqa: BLE001
            e.update(status="failed", reason=f"{type(ex).__name__}: {str(ex)[:600]}",
                     traceback=traceback.format_exc()[-2000:])
        if out0 is not None and ref is not None:
            try:
                e["rel_err"] = self.rel_err(to_common(out0) if to_common else out0, ref)
            except Exception as ex:  # noqa: BLE001
                e["rel_err_error"] = f"{type(ex).__name__}: {ex}"[:300]
        return self._finish(e), out0

    def run_torch(self, spec, impl, fn, sets, *, ref=None, to_common=None, side="peer", phase="main",
                  cuda_only=None, extra=None):
        """Time ``fn(*sets[i % n])``, one call per set in turn, CUDA events as a cross-check."""
        torch = self.torch
        r = self._skip_reason(phase)
        if r:
            return self.skip(spec, impl, side, r), None
        if cuda_only and not self.cuda:
            return self.skip(spec, impl, side, f"skipped: {cuda_only}"), None
        e = self._entry(spec, impl, side, n_sets=len(sets), timing="torch: back-to-back calls, synchronize once",
                        **(extra or {}))
        out0 = None
        n = len(sets)
        try:
            def sync(_o):
                if self.cuda:
                    torch.cuda.synchronize()
            with torch.inference_mode():
                t_c = time.perf_counter()
                sync(fn(*sets[0]))
                e["compile_s"] = time.perf_counter() - t_c  # first call (torch.compile: the compile)
                stats, out0 = self._timeit(lambda i: fn(*sets[i % n]), sync, group=1, events=self.cuda)
                self._apply_timing(e, stats, self.device_span(lambda i: fn(*sets[i % n]), sync, 1))
            e["status"] = "ok"
        except Exception as ex:  # noqa: BLE001
            status = "failed" if self.cuda else "skipped"
            e.update(status=status, reason=f"{type(ex).__name__}: {str(ex)[:600]}" if self.cuda else
                     f"skipped: fails on this CPU host ({type(ex).__name__}: {str(ex)[:400]})",
                     traceback=traceback.format_exc()[-2000:])
        if out0 is not None and ref is not None:
            try:
                e["rel_err"] = self.rel_err(to_common(out0) if to_common else out0, ref)
            except Exception as ex:  # noqa: BLE001
                e["rel_err_error"] = f"{type(ex).__name__}: {ex}"[:300]
        return self._finish(e), out0

    def run_torch_graph(self, spec, impl, fn, sets, *, ref=None, to_common=None, side="peer"):
        """``fn`` over all ``sets`` captured in ONE CUDA graph and replayed: the torch twin of
        the grouped JAX program (no host launch gaps between the eager kernels)."""
        torch = self.torch
        r = self._skip_reason("main")
        if r:
            return self.skip(spec, impl, side, r), None
        if not self.cuda:
            return self.skip(spec, impl, side, "skipped: CUDA graphs need a CUDA device"), None
        e = self._entry(spec, impl, side, n_sets=len(sets), timing="torch: CUDA graph of all sets, replayed "
                        "back to back, synchronize once")
        out0 = None
        try:
            with torch.inference_mode():
                st = torch.cuda.Stream()
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    for _ in range(2):
                        warm = [fn(*a) for a in sets]
                torch.cuda.current_stream().wait_stream(st)
                del warm
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = [fn(*a) for a in sets]
                gsync = lambda _o: torch.cuda.synchronize()  # noqa: E731
                stats, _ = self._timeit(lambda i: graph.replay(), gsync, group=len(sets), events=True)
                self._apply_timing(e, stats, self.device_span(lambda i: graph.replay(), gsync, len(sets)))
            out0 = outs[0]
            e["status"] = "ok"
        except Exception as ex:  # noqa: BLE001
            e.update(status="failed", reason=f"{type(ex).__name__}: {str(ex)[:600]}",
                     traceback=traceback.format_exc()[-2000:])
        if out0 is not None and ref is not None:
            try:
                e["rel_err"] = self.rel_err(to_common(out0) if to_common else out0, ref)
            except Exception as ex:  # noqa: BLE001
                e["rel_err_error"] = f"{type(ex).__name__}: {ex}"[:300]
        return self._finish(e), out0

    def compiled(self, fn):
        """torch.compile(fn) (mode default) or None with the reason it is not measured here."""
        if not self.cuda and not self.args.compile_on_cpu:
            return None, "skipped: torch.compile is measured on CUDA only (pass --compile-on-cpu to try inductor here)"
        if self.args.no_compile:
            return None, "skipped: --no-compile"
        try:
            return self.torch.compile(fn, dynamic=False), None
        except Exception as ex:  # noqa: BLE001
            return None, f"failed: torch.compile raised {type(ex).__name__}: {str(ex)[:400]}"

    def run_compiled(self, spec, impl, fn, sets, *, ref=None, to_common=None):
        cfn, why = self.compiled(fn)
        if cfn is None:
            status = "failed" if why.startswith("failed") else "skipped"
            return self._finish(self._entry(spec, impl, "peer", status=status, reason=why))
        e = self.run_torch(spec, impl, cfn, sets, ref=ref, to_common=to_common, phase="compile")[0]
        # Also back to back over every set, as the grouped JAX program runs: a call alone on an
        # idle GPU can end with its writes still in L2 (0.5B rms_norm: 5.6 us alone, 6.7 back to
        # back; ours 5.3 / 6.7, benchmarks/results/probe_peer_timing_h100.json).
        self.run_torch_graph(spec, impl + ", CUDA graph", cfn, sets, ref=ref, to_common=to_common)
        return e

    # --- ceilings -------------------------------------------------------------------
    def ceilings(self, key):
        torch = self.torch
        out = {}
        n = (16 << 20) if self.args.smoke else (1 << 30)  # bytes of the source
        src = torch.randn(n // 2, device=self.tdev, dtype=torch.float32).to(torch.bfloat16)
        dst = torch.empty_like(src)
        sync = (lambda _o: torch.cuda.synchronize()) if self.cuda else (lambda _o: None)
        stats, _ = self._timeit(lambda i: dst.copy_(src), sync, group=1, events=self.cuda)
        c = dict(bytes=2 * n, note="dst.copy_(src), bytes read + written")
        self._apply_timing(c, stats, self.device_span(lambda i: dst.copy_(src), sync, 1))
        out["copy"] = dict(c, gbps=2 * n / c["time_s"] / 1e9)
        del src, dst
        m = 256 if self.args.smoke else 8192
        a = torch.randn(m, m, device=self.tdev, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.tdev, dtype=torch.bfloat16)
        stats, _ = self._timeit(lambda i: torch.matmul(a, b), sync, group=1, events=self.cuda)
        c = dict(flops=2 * m**3, note=f"torch.matmul bf16 {m}^3, random normal inputs")
        self._apply_timing(c, stats, self.device_span(lambda i: torch.matmul(a, b), sync, 1))
        out["matmul"] = dict(c, tflops=2 * m**3 / c["time_s"] / 1e12)
        del a, b
        self.free()
        self.res[key] = out
        self.save()
        print(f"[{self.elapsed():6.1f}s] {key}: copy {out['copy']['gbps']:.1f} GB/s, "
              f"bf16 matmul {out['matmul']['tflops']:.1f} TFLOP/s", flush=True)

        # The same copy through JAX (x + 1 on bf16: read + write), as the JAX-side reference.
        if key == "ceilings":
            jnp = self.jnp
            x = self.randn((n // 2,))
            spec = {"op": "ceiling_copy", "model": "-", "shape": f"x[{n // 2}] bf16", "bytes": 2 * n,
                    "bound": "memory"}
            self.run_jax(spec, "jax x + 1 (elementwise read+write)", lambda v: v + jnp.bfloat16(1), [(x,)],
                         side="ceiling")
            del x
            self.free()


# ------------------------------------------------------------------------------------
# The ops. Each takes (bench, model, phase); phase "main" runs our kernels and the
# non-compiled peers, phase "compile" runs the torch.compile peers (after the model's main
# phase, and stopped 45 s before the budget, so that a slow inductor cannot starve the
# main measurements).
# ------------------------------------------------------------------------------------

def same_size_copy(b: Bench, spec: dict, nbytes: int, fn, sets) -> None:
    """The size-matched ceiling of a memory-bound op: ``x + 1`` over the same tensors (read
    and written once, ``nbytes``), timed the same way. A kernel this size pays a fixed
    ramp and tail that a 1 GiB copy hides; this entry shows what a plain copy keeps."""
    b.run_jax(dict(spec, bytes=nbytes), "jax x + 1 over the same tensors (size-matched copy)", fn, sets,
              side="ceiling")


def same_size_memcpy(b: Bench, spec: dict, nbytes: int, n: int) -> None:
    """The hardware's own size-matched ceiling: the driver's device-to-device copy (torch
    ``dst.copy_(src)``) of half of ``nbytes`` (``nbytes`` read and written), ``n`` buffer
    pairs in one CUDA graph, replayed: the 1 GiB ceiling's own operation at the op's size.
    At these sizes it keeps 0.91 (28 MiB) to 0.92 (32 MiB) of the 1 GiB copy on an H100
    (benchmarks/probe_size_ceiling.py, which also times the curve from 4 MiB up)."""
    torch = b.torch
    half = nbytes // 2
    sets = [(torch.ones(half, dtype=torch.uint8, device=b.tdev), torch.empty(half, dtype=torch.uint8, device=b.tdev))
            for _ in range(n)] if b.cuda else []
    b.run_torch_graph(dict(spec, bytes=nbytes), "torch dst.copy_(src) of the same bytes (driver memcpy, size-matched)",
                      lambda src, dst: dst.copy_(src), sets, side="ceiling")


def _hf():
    from transformers.models.qwen2 import modeling_qwen2 as mq
    return mq


def op_rms_norm(b: Bench, m: Model, phase: str):
    import kernels
    torch = b.torch
    T, D = m.T, m.D
    nbytes = 2 * T * D * BF + D * BF
    spec = dict(op="rms_norm", model=m.name, shape=f"x[{T},{D}] w[{D}] bf16", bytes=nbytes, bound="memory")
    n = b.n_sets(nbytes)
    xs = [b.randn((T, D)) for _ in range(n)]
    w = b.randn((D,), 0.1) + 1
    w = w.astype(b.jnp.bfloat16)
    mod = _hf().Qwen2RMSNorm(D, eps=EPS).to(device=b.tdev, dtype=torch.bfloat16)
    with torch.no_grad():
        mod.weight.copy_(b.t(w))
    tsets = [(b.t(x),) for x in xs]
    with torch.inference_mode():
        ref = mod(*tsets[0])
    if phase == "main":
        b.run_torch(spec, "hf eager Qwen2RMSNorm", mod, tsets, ref=ref)
        b.run_torch_graph(spec, "hf eager Qwen2RMSNorm, CUDA graph", mod, tsets, ref=ref)
        b.run_jax(spec, "kernels.rms_norm(hf)", lambda x, w: kernels.rms_norm(x, w, eps=EPS, recipe="hf"),
                  [(x, w) for x in xs], ref=ref, extra={"recipe": "hf"})
        b.run_jax(spec, "kernels.rms_norm(hf, implementation=xla)",
                  lambda x, w: kernels.rms_norm(x, w, eps=EPS, recipe="hf", implementation="xla"),
                  [(x, w) for x in xs], ref=ref, extra={"recipe": "hf", "implementation": "xla"})
        same_size_copy(b, spec, 2 * T * D * BF, lambda x, w: x + 1, [(x, w) for x in xs])
        same_size_memcpy(b, spec, 2 * T * D * BF, n)
    else:
        b.run_compiled(spec, "torch.compile(Qwen2RMSNorm)", mod, tsets, ref=ref)


def _rope_tables(b: Bench, m: Model):
    import kernels
    jnp, jax = b.jnp, b.jax
    inv, scale = kernels.rope_frequencies(m.H, theta=THETA)
    pos = jnp.arange(m.T, dtype=jnp.int32)[None, :]
    f = jax.jit(lambda p, i: kernels.rope_cos_sin(p, i, attention_scaling=scale, dtype=jnp.bfloat16))
    return f(pos, jnp.asarray(inv))


def op_apply_rope(b: Bench, m: Model, phase: str):
    import kernels
    mq = _hf()
    T, N, K, H = m.T, m.N, m.K, m.H
    nbytes = 2 * (T * N * H + T * K * H) * BF + 2 * T * H * BF
    spec = dict(op="apply_rope", model=m.name, shape=f"q[1,{T},{N},{H}] k[1,{T},{K},{H}] cos/sin[1,{T},{H}] bf16",
                bytes=nbytes, bound="memory")
    n = b.n_sets(nbytes)
    cos, sin = _rope_tables(b, m)
    qs = [b.randn((1, T, N, H)) for _ in range(n)]
    ks = [b.randn((1, T, K, H)) for _ in range(n)]
    tc, ts = b.t(cos), b.t(sin)
    # HF's layout after the transpose in Qwen2Attention: [B, heads, T, H], contiguous here.
    tsets = [(b.t(q).transpose(1, 2).contiguous(), b.t(k).transpose(1, 2).contiguous(), tc, ts) for q, k in zip(qs, ks)]
    with b.torch.inference_mode():
        ref = [r.transpose(1, 2) for r in mq.apply_rotary_pos_emb(*tsets[0])]  # -> [B, T, heads, H]
    to_common = lambda o: [r.transpose(1, 2) for r in o]  # noqa: E731
    if phase == "main":
        b.run_torch(spec, "hf eager apply_rotary_pos_emb", mq.apply_rotary_pos_emb, tsets, ref=ref, to_common=to_common)
        b.run_torch_graph(spec, "hf eager apply_rotary_pos_emb, CUDA graph", mq.apply_rotary_pos_emb, tsets, ref=ref,
                          to_common=to_common)
        jsets = [(q, k, cos, sin) for q, k in zip(qs, ks)]
        b.run_jax(spec, "kernels.apply_rope_qk (one launch)",
                  lambda q, k, c, s: kernels.apply_rope_qk(q, k, c, s), jsets, ref=ref, extra={"recipe": "half"})
        b.run_jax(spec, "kernels.apply_rope, q and k (two calls)",
                  lambda q, k, c, s: (kernels.apply_rope(q, c, s), kernels.apply_rope(k, c, s)), jsets, ref=ref,
                  extra={"recipe": "half"})
        b.run_jax(spec, "kernels.apply_rope_qk(implementation=xla)",
                  lambda q, k, c, s: kernels.apply_rope_qk(q, k, c, s, implementation="xla"), jsets, ref=ref,
                  extra={"recipe": "half", "implementation": "xla"})
        same_size_copy(b, spec, 2 * (T * N * H + T * K * H) * BF, lambda q, k, c, s: (q + 1, k + 1), jsets)
        same_size_memcpy(b, spec, 2 * (T * N * H + T * K * H) * BF, n)
    else:
        b.run_compiled(spec, "torch.compile(apply_rotary_pos_emb)", mq.apply_rotary_pos_emb, tsets, ref=ref,
                       to_common=to_common)


def op_swiglu_act(b: Bench, m: Model, phase: str):
    from kernels.models.qwen2 import mlp_act
    from transformers import Qwen2Config
    torch = b.torch
    T, F = m.T, m.F
    nbytes = 3 * T * F * BF
    spec = dict(op="swiglu_act", model=m.name, shape=f"g,u[{T},{F}] bf16 -> silu(g)*u", bytes=nbytes, bound="memory")
    n = b.n_sets(nbytes)
    gs = [b.randn((T, F), 2.0) for _ in range(n)]
    us = [b.randn((T, F)) for _ in range(n)]
    mlp = _hf().Qwen2MLP(Qwen2Config(hidden_size=8, intermediate_size=8, hidden_act="silu"))
    act = mlp.act_fn

    def hf_act(g, u):  # Qwen2MLP.forward's act_fn(gate_proj(x)) * up_proj(x), on given g and u
        return act(g) * u

    tsets = [(b.t(g), b.t(u)) for g, u in zip(gs, us)]
    with torch.inference_mode():
        ref = hf_act(*tsets[0])
    if phase == "main":
        b.run_torch(spec, "hf eager Qwen2MLP act_fn(g)*u", hf_act, tsets, ref=ref)
        b.run_torch_graph(spec, "hf eager act_fn(g)*u, CUDA graph", hf_act, tsets, ref=ref)
        b.run_jax(spec, "kernels.models.qwen2.mlp_act", mlp_act, [(g, u) for g, u in zip(gs, us)], ref=ref)
    else:
        b.run_compiled(spec, "torch.compile(act_fn(g)*u)", hf_act, tsets, ref=ref)


def op_softmax(b: Bench, m: Model, phase: str):
    import kernels
    torch = b.torch
    N, T = m.N, m.T
    nbytes = 2 * N * T * T * BF
    spec = dict(op="softmax", model=m.name, shape=f"x[1,{N},{T},{T}] bf16 (f32 inside)", bytes=nbytes,
                bound="memory")
    n = b.n_sets(nbytes)
    xs = [b.randn((1, N, T, T), 3.0) for _ in range(n)]

    def hf_softmax(x):  # eager_attention_forward's softmax(dim=-1, dtype=float32).to(dtype)
        return torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)

    tsets = [(b.t(x),) for x in xs]
    with torch.inference_mode():
        ref = hf_softmax(*tsets[0])
    if phase == "main":
        b.run_torch(spec, "hf eager softmax(f32).to(bf16)", hf_softmax, tsets, ref=ref)
        b.run_torch_graph(spec, "hf eager softmax, CUDA graph", hf_softmax, tsets, ref=ref)
        b.run_jax(spec, "kernels.softmax", lambda x: kernels.softmax(x, axis=-1), [(x,) for x in xs], ref=ref)
    else:
        b.run_compiled(spec, "torch.compile(softmax f32 .to(bf16))", hf_softmax, tsets, ref=ref)


class _AttnModule:  # built lazily (needs torch.nn)
    @staticmethod
    def make(torch, groups):
        mod = torch.nn.Module()
        mod.num_key_value_groups = groups
        mod.eval()
        return mod


def _sdpa(b: Bench, backend_name: str, causal: bool):
    torch = b.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def f(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return f


def _attention(b: Bench, m: Model, phase: str, decode: bool):
    import kernels
    jax, jnp, torch = b.jax, b.jnp, b.torch
    mq = _hf()
    N, K, H = m.N, m.K, m.H
    T, S = (1, m.S) if decode else (m.T, m.T)
    scaling = H ** -0.5
    if decode:
        nbytes = 2 * S * K * H * BF
        spec = dict(op="attention_decode", model=m.name, shape=f"q[1,1,{N},{H}] kv cache[1,{S},{K},{H}] bf16",
                    bytes=nbytes, flops=4 * N * S * H, bound="memory")
        n = b.n_sets(nbytes)
    else:
        spec = dict(op="attention_prefill", model=m.name, shape=f"q[1,{T},{N},{H}] k,v[1,{S},{K},{H}] bf16 causal",
                    bytes=(2 * T * N * H + 2 * S * K * H) * BF, flops=4 * N * T * S * H // 2, bound="compute")
        n = 1
    qs = [b.randn((1, T, N, H)) for _ in range(n)]
    ks = [b.randn((1, S, K, H)) for _ in range(n)]
    vs = [b.randn((1, S, K, H)) for _ in range(n)]
    jsets = [(q, k, v) for q, k, v in zip(qs, ks, vs)]
    # torch layout [B, heads, len, H]
    tsets = [tuple(b.t(a).transpose(1, 2).contiguous() for a in s) for s in jsets]
    amod = _AttnModule.make(torch, N // K)
    if decode:
        mask = None  # one query at the end of the cache sees every key
    else:
        vis = torch.ones(T, S, dtype=torch.bool, device=b.tdev).tril(S - T)
        mask = torch.zeros(1, 1, T, S, dtype=torch.bfloat16, device=b.tdev).masked_fill(
            ~vis, torch.finfo(torch.bfloat16).min)  # HF's additive eager mask

    def hf_eager(q, k, v):
        return mq.eager_attention_forward(amod, q, k, v, mask, scaling)[0]  # [B, T, N, H]

    with torch.inference_mode():
        ref = hf_eager(*tsets[0])
    btnh = lambda o: o.transpose(1, 2)  # noqa: E731  [B, N, T, H] -> [B, T, N, H]
    if phase == "compile":
        b.run_compiled(spec, "torch.compile(eager_attention_forward)", hf_eager, tsets, ref=ref)
        return
    b.run_torch(spec, "hf eager_attention_forward (repeat_kv)", hf_eager, tsets, ref=ref)
    if decode:
        b.run_torch_graph(spec, "hf eager_attention_forward, CUDA graph", hf_eager, tsets, ref=ref)
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        e, _ = b.run_torch(spec, f"torch SDPA {backend.split('_')[0].lower()} (enable_gqa)",
                           _sdpa(b, backend, not decode), tsets, ref=ref, to_common=btnh,
                           extra={"sdpa_backend": backend})
        if e["status"] == "failed":  # the backend may refuse enable_gqa: time it on k, v repeated to N heads
            rsets = [(q, mq.repeat_kv(k, N // K), mq.repeat_kv(v, N // K)) for q, k, v in tsets]
            b.run_torch(spec, f"torch SDPA {backend.split('_')[0].lower()} (k,v pre-repeated)",
                        _sdpa(b, backend, not decode), rsets, ref=ref, to_common=btnh,
                        extra={"sdpa_backend": backend, "note": "enable_gqa failed; MHA on repeated k, v"})
            del rsets
    if decode:
        b.run_torch_graph(spec, "torch SDPA flash (enable_gqa), CUDA graph", _sdpa(b, "FLASH_ATTENTION", False),
                          tsets, ref=ref, to_common=btnh)
    variants = [{"recipe": "hf"}, {"recipe": "fp32_logits"},
                {"recipe": "hf", "implementation": "pallas"}, {"recipe": "fp32_logits", "implementation": "pallas"},
                {"recipe": "fp32_logits", "implementation": "pallas_flash"}]  # one pass, flash numerics
    if decode:  # the XLA path beside the default (Pallas on a GPU), on the same clock
        variants.append({"recipe": "hf", "implementation": "xla"})
        variants.append({"recipe": "fp32_logits", "implementation": "mosaic_flash"})  # TMA-fed, Hopper only
    else:
        variants.append({"recipe": "fp32_logits", "q_chunk": max(1, T // 4)})
        variants.append({"recipe": "fp32_logits", "implementation": "cudnn"})  # T == S: cuDNN's causal is ours
    for extra in b.args.attn_variants:
        variants.append(dict(extra))
    for kw in variants:
        label = "kernels.gqa_attention(" + ",".join(f"{v}" if k == "recipe" else f"{k}={v}" for k, v in kw.items()) + ")"
        impl = kw.get("implementation")
        b.run_jax(spec, label, lambda q, k, v, kw=kw: kernels.gqa_attention(q, k, v, causal=True, **kw), jsets,
                  ref=ref, extra={"recipe": kw.get("recipe", "hf"), "kwargs": kw},
                  needs_gpu=f"implementation={impl!r}" if impl in ("pallas", "pallas_flash", "mosaic_flash", "cudnn")
                  else None)
    for impl in ("xla", "cudnn"):
        b.run_jax(spec, f"jax.nn.dot_product_attention({impl})",
                  lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=not decode,
                                                                          implementation=impl),
                  jsets, ref=ref, side="peer", needs_gpu="implementation='cudnn'" if impl == "cudnn" else None)
    if decode:  # what reading the cache alone costs: one XLA reduction over k and v
        b.run_jax(dict(spec, flops=None), "XLA max over k and v (reads the cache once, same bytes)",
                  lambda q, k, v: jnp.maximum(jnp.max(k, axis=1), jnp.max(v, axis=1)), jsets, side="ceiling")


def op_attention_prefill(b, m, phase):
    _attention(b, m, phase, decode=False)


def op_attention_decode(b, m, phase):
    _attention(b, m, phase, decode=True)


LM_OURS = "kernels.lm_head(logits_dtype=float32, w_layout=VD)"  # the summary's side: as the Qwen2 model calls it


def op_lm_head(b: Bench, m: Model, phase: str):
    if phase != "main":
        return
    import kernels
    from kernels.linear_mosaic import hopper
    torch, jnp = b.torch, b.jnp
    F = torch.nn.functional
    T, D, V = m.T, m.D, m.V
    h = b.randn((T, D))
    w = b.randn((D, V), D ** -0.5)  # [D, V]: the kernels' [in, out]
    wv = jnp.asarray(w.T)  # [V, D]: HF's lm_head.weight layout (the Qwen2 model's), a real copy
    th, tw, twv = b.t(h), b.t(w), b.t(wv)
    with torch.inference_mode():
        ref = torch.matmul(th, tw)
    flops = 2 * T * D * V
    layouts = (("VD", wv), ("DV", w))
    for ld, ob in (("float32", 4), (None, 2)):
        spec = dict(op="lm_head", model=m.name, shape=f"h[{T},{D}] @ w (D={D}, V={V}) bf16 -> {ld or 'bf16'}",
                    flops=flops, bytes=(T * D + D * V) * BF + T * V * ob, bound="compute")
        for lay, ww in layouts:
            b.run_jax(spec, f"kernels.lm_head(logits_dtype={ld}, w_layout={lay})",
                      lambda h, w, ld=ld, lay=lay: kernels.lm_head(h, w, logits_dtype=ld, w_layout=lay), [(h, ww)],
                      ref=ref, extra={"logits_dtype": ld or "bf16", "w_layout": lay})
        # The implementation the default does not pick for these logits (kernels.projection.lm_head):
        # XLA's GEMM for model-dtype logits, the mosaic GEMM (Hopper only) for float32 ones.
        alt = "mosaic" if ld == "float32" else "xla"
        if alt == "xla" or hopper():
            b.run_jax(spec, f"kernels.lm_head(logits_dtype={ld}, w_layout=VD, implementation={alt})",
                      lambda h, w, ld=ld, alt=alt: kernels.lm_head(h, w, logits_dtype=ld, w_layout="VD",
                                                                   implementation=alt),
                      [(h, wv)], ref=ref, extra={"logits_dtype": ld or "bf16", "w_layout": "VD"})
        if ld == "float32":
            b.run_jax(spec, "jnp.matmul default prec, f32 out, w[D,V]",
                      lambda h, w: jnp.matmul(h, w, preferred_element_type=jnp.float32), [(h, w)], ref=ref,
                      side="peer")
            b.run_torch(spec, "torch.mm(out_dtype=float32) (cuBLAS), w[D,V]",
                        lambda h, w: torch.mm(h, w, out_dtype=torch.float32), [(th, tw)], ref=ref)
        else:
            b.run_torch(spec, "torch.matmul bf16 (cuBLAS), w[D,V]", torch.matmul, [(th, tw)], ref=ref,
                        extra={"cublas_reference": True})
            b.run_torch(spec, "F.linear bf16 (cuBLAS), w[V,D] (HF's nn.Linear)", F.linear, [(th, twv)], ref=ref,
                        extra={"cublas_reference": True})
    if m.name == "7b" and b.on_gpu:
        # The summary's ratio, timed in turns: ours, cuBLAS, ours, ... A 6 ms GEMM at the
        # H100's power limit drifts by 5-10% over a run (timed apart, kernels.lm_head read
        # 1.043 of cuBLAS in session 5, 0.980 and 1.062 in two runs of session 6); in turns,
        # the drift lands on both sides alike. Both weight layouts on both sides; the
        # summary takes ours as the model calls it (w_layout="VD") against the faster torch.
        jl = b.jax.jit(lambda h, w, lay, impl=None: kernels.lm_head(h, w, logits_dtype="float32", w_layout=lay,
                                                                    implementation=impl), static_argnums=(2, 3))
        tsync = lambda _: torch.cuda.synchronize()
        with torch.inference_mode():
            sides = {LM_OURS: (lambda i: jl(h, wv, "VD"), b.jax.block_until_ready),
                     "kernels.lm_head(logits_dtype=float32, w_layout=DV)": (lambda i: jl(h, w, "DV"),
                                                                           b.jax.block_until_ready),
                     "torch.matmul bf16 (cuBLAS), w[D,V]": (lambda i: torch.matmul(th, tw), tsync),
                     "F.linear bf16 (cuBLAS), w[V,D] (HF's nn.Linear)": (lambda i: F.linear(th, twv), tsync)}
            if hopper():  # the float32 logits on the mosaic GEMM, which the default leaves to XLA's
                sides["kernels.lm_head(logits_dtype=float32, w_layout=VD, implementation=mosaic)"] = (
                    lambda i: jl(h, wv, "VD", "mosaic"), b.jax.block_until_ready)
            from devtime import in_turns

            spans, _ = in_turns(torch, sides, rounds=b.args.lm_head_turns, calls=b.args.device_calls)
        med = {k: statistics.median(v) for k, v in spans.items()}
        peer = min((k for k in med if not k.startswith("kernels.")), key=lambda k: med[k])
        b.res["lm_head_turns"] = {"rounds": b.args.lm_head_turns, "calls_a_turn": b.args.device_calls,
                                  "spans_s": spans, "median_s": med,
                                  "tflops": {k: flops / v / 1e12 for k, v in med.items()},
                                  "ours": LM_OURS, "peer": peer, "ratio": med[peer] / med[LM_OURS]}
        print(f"[{b.elapsed():6.1f}s] lm_head in turns: ours/cuBLAS = {med[peer] / med[LM_OURS]:.4f}", flush=True)
    del h, w, wv, th, tw, twv, ref


def op_linear(b: Bench, m: Model, phase: str):
    if phase != "main":
        return
    import kernels
    torch = b.torch
    T, D = m.T, m.D
    for name, I, O, bias in (("q_proj", D, m.N * m.H, True), ("gate_proj", D, m.F, False),
                             ("down_proj", m.F, D, False)):
        x = b.randn((T, I))
        w = b.randn((I, O), I ** -0.5)
        bb = b.randn((O,)) if bias else None
        tx, tw_t = b.t(x), b.t(w).t().contiguous()  # nn.Linear's weight is [out, in]
        tb = b.t(bb) if bias else None
        spec = dict(op=f"linear_{name}", model=m.name, shape=f"x[{T},{I}] @ w[{I},{O}]" + (" + b" if bias else ""),
                    flops=2 * T * I * O, bytes=(T * I + I * O + T * O + (O if bias else 0)) * BF, bound="compute")
        with torch.inference_mode():
            ref = torch.nn.functional.linear(tx, tw_t, tb)
        b.run_torch(spec, "torch F.linear bf16 (cuBLAS)", torch.nn.functional.linear,
                    [(tx, tw_t, tb)], ref=ref)
        # The default (on a Hopper GPU: the mosaic GEMM where the shape tiles) and the XLA path.
        for impl in (None, "xla"):
            label = "kernels.linear" + (f"(implementation={impl})" if impl else "")
            if bias:
                b.run_jax(spec, label, lambda x, w, c, impl=impl: kernels.linear(x, w, c, implementation=impl),
                          [(x, w, bb)], ref=ref)
            else:
                b.run_jax(spec, label, lambda x, w, impl=impl: kernels.linear(x, w, implementation=impl), [(x, w)],
                          ref=ref)
        del x, w, bb, tx, tw_t, tb, ref
        b.free()


OPS = {
    "rms_norm": op_rms_norm, "apply_rope": op_apply_rope, "swiglu_act": op_swiglu_act, "softmax": op_softmax,
    "attention_prefill": op_attention_prefill, "attention_decode": op_attention_decode,
    "lm_head": op_lm_head, "linear": op_linear,
}


# ------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------

def summarize(res: dict) -> None:
    ents = [e for e in res["entries"] if e.get("status") == "ok"]
    summ, notes = {}, {}

    def pick(op, side="ours", model="7b", cond=lambda e: True):
        c = [e for e in ents if e["op"] == op and e["side"] == side and e["model"] == model and cond(e)]
        return max(c, key=lambda e: e.get("gbps") or e.get("tflops") or 0) if c else None

    def why_missing(op, side="ours", cond=lambda e: True):
        c = [e for e in res["entries"] if e["op"] == op and e["side"] == side and e["model"] == "7b" and cond(e)]
        if not c:
            return f"no {side} {op} entry for 7b in this run"
        return "; ".join(f"{e['impl']}: {e.get('status')}: {str(e.get('reason', ''))[:150]}" for e in c)

    copy = res.get("ceilings", {}).get("copy", {}).get("gbps")
    for key, op in (("rms_norm_bw_frac", "rms_norm"), ("apply_rope_bw_frac", "apply_rope"),
                    ("swiglu_bw_frac", "swiglu_act"), ("softmax_bw_frac", "softmax"),
                    ("decode_bw_frac", "attention_decode")):
        e = pick(op)
        if e and e.get("frac") is not None:
            summ[key] = round(e["frac"], 4)
            notes[key] = f"{e['impl']}: {e['gbps']:.0f} GB/s of copy {copy:.0f} GB/s, {_fmt_time(e['time_s'])}"
            if op == "attention_decode":
                notes[key] = "fastest recipe and implementation, " + notes[key]
        else:
            summ[key] = None
            notes[key] = why_missing(op)

    sdpa = pick("attention_prefill", side="peer", cond=lambda e: e.get("sdpa_backend") == "FLASH_ATTENTION")
    for key, recipe in (("attention_vs_sdpa", "fp32_logits"), ("attention_hf_vs_sdpa", "hf")):
        ours = pick("attention_prefill", cond=lambda e, r=recipe: e.get("recipe") == r)
        if ours and sdpa:
            summ[key] = round(ours["tflops"] / sdpa["tflops"], 4)
            notes[key] = (f"{ours['impl']} {ours['tflops']:.1f} vs {sdpa['impl']} {sdpa['tflops']:.1f} TFLOP/s "
                          f"(causal half counted)")
        else:
            summ[key] = None
            notes[key] = ("ours: " + (why_missing("attention_prefill", cond=lambda e, r=recipe: e.get("recipe") == r)
                                      if not ours else "ok")
                          + "; sdpa flash: " + (why_missing("attention_prefill", side="peer",
                                                            cond=lambda e: e.get("sdpa_backend") == "FLASH_ATTENTION")
                                                if not sdpa else "ok"))
    ours = pick("lm_head", cond=lambda e: e.get("logits_dtype") == "float32")
    cub = pick("lm_head", side="peer", cond=lambda e: e.get("cublas_reference"))
    turns = res.get("lm_head_turns")
    if turns and turns["ratio"] == turns["ratio"]:  # not NaN: every turn was timed
        tf = turns["tflops"]
        summ["lm_head_vs_cublas"] = round(turns["ratio"], 4)
        apart = f" (timed apart: {ours['tflops'] / cub['tflops']:.3f})" if ours and cub else ""
        notes["lm_head_vs_cublas"] = (f"{turns['ours']} {tf[turns['ours']]:.1f} vs {turns['peer']} "
                                      f"{tf[turns['peer']]:.1f} TFLOP/s (the faster torch layout), medians of "
                                      f"{turns['rounds']} turns in alternation{apart}")
    elif ours and cub:
        summ["lm_head_vs_cublas"] = round(ours["tflops"] / cub["tflops"], 4)
        notes["lm_head_vs_cublas"] = (f"{ours['impl']} {ours['tflops']:.1f} vs torch bf16 matmul "
                                      f"{cub['tflops']:.1f} TFLOP/s")
    else:
        summ["lm_head_vs_cublas"] = None
        notes["lm_head_vs_cublas"] = ("ours: " + (why_missing("lm_head", cond=lambda e: e.get("logits_dtype") == "float32")
                                                  if not ours else "ok") + "; cublas: "
                                      + (why_missing("lm_head", side="peer", cond=lambda e: e.get("cublas_reference"))
                                         if not cub else "ok"))
    for key, op in (("rms_norm_bw_frac", "rms_norm"), ("apply_rope_bw_frac", "apply_rope"),
                    ("decode_bw_frac", "attention_decode")):
        for c in [e for e in ents if e["op"] == op and e["side"] == "ceiling" and e["model"] == "7b"
                  and e.get("frac") is not None and key in notes]:
            what = "read" if op == "attention_decode" else "memcpy" if "memcpy" in c["impl"] else "copy (x + 1)"
            notes[key] += f"; same-size {what}: {c['frac']:.3f}"
    res["summary"] = {k: summ.get(k) for k in SUMMARY_KEYS}
    res["summary_notes"] = notes


# ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats (CPU check)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (default %(default)s; a copy also goes "
                    "to $OUT/<name> when $OUT is a folder)")
    ap.add_argument("--markdown", metavar="JSON", help="render README-ready markdown from a results JSON and exit")
    ap.add_argument("--models", default="7b,0.5b", help="comma list of 7b, 0.5b")
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    ap.add_argument("--repeats", type=int, default=0, help="timings per measurement (median); default 5, smoke 2")
    ap.add_argument("--target-ms", type=float, default=0, help="length of one pipelined timing; default 50, smoke 2")
    ap.add_argument("--device-calls", type=int, default=5, help="calls traced by CUPTI per measurement (median)")
    ap.add_argument("--lm-head-turns", type=int, default=7,
                    help="turns of the 7B lm_head timing in alternation (ours, cuBLAS, ...): lm_head_vs_cublas")
    ap.add_argument("--budget-s", type=float, default=240, help="skip (and record) measurements that would start "
                    "after this many seconds from the start of the process; torch.compile peers stop 45 s earlier")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (recorded)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="try torch.compile without CUDA too")
    ap.add_argument("--attn-variants", type=json.loads, default=[],
                    help='extra gqa_attention kwargs to time, as JSON, e.g. \'[{"recipe": "fp32_logits", "q_chunk": 512}]\'')
    args = ap.parse_args(argv)

    if args.markdown:
        print(render_markdown(json.loads(Path(args.markdown).read_text())))
        return 0

    # Before jax is imported: JAX must not grab 75% of the GPU (torch shares it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for p in (ROOT, ROOT / "benchmarks"):  # kernels; devtime (also there when run as a file)
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))

    b = Bench(args)
    print(f"device: {b.res['device'].get('name')} | {b.res['versions']}", flush=True)
    b.ceilings("ceilings")
    want_models = [mm for mm in models(args.smoke) if mm.name in args.models.split(",")]
    want_ops = [o for o in args.ops.split(",") if o]
    for o in want_ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; choose from {list(OPS)}")
    # 7B first (the summary reads it), each model's torch.compile peers right after its main
    # measurements; --budget-s skips (and records) whatever would start too late.
    for mm in want_models:
        for phase in ("main", "compile"):
            for o in want_ops:
                try:
                    OPS[o](b, mm, phase)
                except Exception as ex:  # noqa: BLE001  (set-up failure: record it, go on)
                    spec = dict(op=o, model=mm.name, shape="?", bound="-")
                    b._finish(b._entry(spec, f"(set-up of {o}, phase {phase})", "-", status="failed",
                                       reason=f"{type(ex).__name__}: {str(ex)[:600]}",
                                       traceback=traceback.format_exc()[-2000:]))
                b.free()
    b.ceilings("ceilings_end")
    b.res["elapsed_s"] = b.elapsed()
    summarize(b.res)
    b.save()
    print("\n" + render_markdown(b.res, summary_last=True, compact=True), flush=True)
    print(f"\nresults: {b.out}" + (f" (and {b.out_copy})" if b.out_copy else "")
          + f"; elapsed {b.elapsed():.0f} s", flush=True)
    print("summary: " + json.dumps(b.res["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
