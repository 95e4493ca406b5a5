"""Device time of a call from CUPTI: the benchmarks' shared clock (GPU only).

torch.profiler's CUDA activity trace records every kernel the process launches, JAX's
(XLA's and Pallas/Triton's) included, with the device's own start and end times. So
the time of a JAX program is measured without the host: ``device_span`` runs the call
``calls`` times, each followed by a synchronize and a 2 ms pause (an idle gap that
separates the calls' kernels in the trace), and takes each call's span from its first
kernel's start to its last kernel's end. The gaps between a call's own kernels count;
the host's dispatch before the first kernel does not.

Why not the host clock: XLA's GPU runtime spends ~10-20 us of host time per kernel
launch, so a program of short kernels, pipelined call after call, is timed by the host
(benchmarks/results/probe_timing_h100.json: 7B rms_norm 24.7 us a kernel pipelined,
21.0 us on the device; 0.5B 11.1 us against 6.3 us).
"""

from __future__ import annotations

import collections
import statistics
import time

GAP_US = 1000  # kernels closer than this belong to one call (calls are 2 ms apart)


def traced_calls(torch, call, sync, calls: int) -> list[list]:
    """The device kernels of ``calls`` calls of ``call(i)`` (after one untraced warm call), as
    torch.profiler events in time order, grouped by the 2 ms pause after each call (one group
    a call, unless a call pauses over ``GAP_US`` inside or launches nothing)."""
    from torch.profiler import ProfilerActivity, profile

    sync(call(0))  # warm: nothing of a first call (allocation, autotuning) in the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            sync(call(i + 1))
            time.sleep(0.002)
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)  # times in us
    groups: list[list] = []
    for e in evs:
        if groups and e.time_range.start - groups[-1][-1].time_range.end < GAP_US:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def device_span(torch, call, sync, group: int = 1, calls: int = 5, top: int = 4) -> dict:
    """Median device seconds per application of ``call(i)`` (``group`` applications a call).

    ``sync(out)`` waits for a call's result. Returns ``span_s`` (the median span / group),
    ``spans_s``, ``busy_s`` (summed kernel durations / group), ``kernels_per_app`` and
    ``top_kernels_s`` (the ``top`` largest by summed duration); or ``{"error": ...}`` when
    the trace does not split into one kernel group per call (a call with a pause over 1 ms
    inside, or no kernels at all).
    """
    groups = traced_calls(torch, call, sync, calls)
    if len(groups) != calls:
        return {"error": f"{len(groups)} kernel groups in the trace for {calls} calls"}
    spans = [(g[-1].time_range.end - g[0].time_range.start) * 1e-6 / group for g in groups]
    busy = [sum(e.time_range.end - e.time_range.start for e in g) * 1e-6 / group for g in groups]
    by_name: collections.Counter = collections.Counter()
    for e in groups[-1]:
        by_name[e.name[:60]] += (e.time_range.end - e.time_range.start) * 1e-6 / group
    return {"span_s": statistics.median(spans), "spans_s": spans, "busy_s": statistics.median(busy),
            "kernels_per_app": len(groups[-1]) / group, "top_kernels_s": dict(by_name.most_common(top))}


def in_turns(torch, sides: dict, *, rounds: int, calls: int = 5) -> tuple[dict, dict]:
    """Device spans of several sides timed in turns: each round runs every side once
    (``calls`` calls under the trace, :func:`device_span`), so that a drift over the run
    (clocks, the power limit) lands on every side alike.

    ``sides``: name -> ``(call, sync)``. Returns ``(spans, kernels)``: name -> the span of
    each round (NaN where a turn's trace failed), and name -> its largest kernels' names.
    """
    spans: dict = {k: [] for k in sides}
    kernels: dict = {}
    for _ in range(rounds):
        for k, (call, sync) in sides.items():
            d = device_span(torch, call, sync, 1, calls=calls)
            spans[k].append(d.get("span_s", float("nan")))
            kernels[k] = list(d.get("top_kernels_s") or {})[:2]
    return spans, kernels


def grouped_span(jax, torch, fn, sets, *, calls: int = 5) -> dict:
    """:func:`device_span` of one jitted program applying ``fn`` to every input set of ``sets``
    (one dispatch, ``len(sets)`` applications), compiled and run once before the trace.
    Raises RuntimeError when the trace cannot be split into calls."""
    g = jax.jit(lambda ss: [fn(*s) for s in ss])
    jax.block_until_ready(g(sets))
    d = device_span(torch, lambda i: g(sets), jax.block_until_ready, len(sets), calls=calls)
    if "error" in d:
        raise RuntimeError(d["error"])
    return d


def copy_gb_s(torch, *, nbytes: int = 1 << 29, calls: int = 5) -> float:
    """The copy ceiling on the device's clock: torch ``dst.copy_(src)`` of ``nbytes``, counting
    the bytes read and written (2 * nbytes a copy), in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    d = device_span(torch, lambda i: dst.copy_(src), lambda _: torch.cuda.synchronize(), 1, calls=calls)
    if "error" in d:
        raise RuntimeError(d["error"])
    return 2 * nbytes / d["span_s"] / 1e9
