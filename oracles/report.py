"""``parity report``: markdown plus PNG plots of the measured errors, with the budgets drawn.

Per op and dtype, from one sweep (the same strategies as the tests):
- a histogram of the per-element ulp distance against the oracle (parity), with the
  ``max_ulps`` budget as a vertical line;
- a histogram of the per-case accuracy ratio against the float64 truth, with the
  ``ratio`` budget;
- the per-case worst error against the truth (in ulps of the output dtype at the truth's
  magnitude) plotted over the largest input magnitude: where bf16 amplification shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from oracles import compare

_MAX_SAMPLES = 20000  # per-element ulps kept per op x dtype (a uniform sample)


class Collector:
    """Accumulates per-case measurements of one op x dtype for plotting."""

    def __init__(self, rng_seed: int = 0):
        self.ulps: list[np.ndarray] = []
        self.ratios: list[float] = []
        self.mag: list[float] = []
        self.err_ulps: list[float] = []
        self.oracle_err_ulps: list[float] = []
        self.budget = None
        self._rng = np.random.default_rng(rng_seed)

    def __call__(self, case, outcome, budget, judgments) -> None:
        self.budget = budget
        if outcome.kernel.shape != outcome.oracle.shape:
            return
        udt = outcome.ulp_dtype or outcome.out_dtype
        d = compare.ulp_distance(outcome.kernel, outcome.oracle, dtype=udt, floor_rel=budget.parity.floor_rel).ravel()
        d = d[np.isfinite(d)]
        if d.size > 2000:
            d = self._rng.choice(d, 2000, replace=False)
        self.ulps.append(d)
        acc = next((j for j in judgments if j.kind == "accuracy"), None)
        if acc is not None and math.isfinite(acc.measured["ratio"]):
            self.ratios.append(acc.measured["ratio"])
        t = outcome.truth
        fin = np.isfinite(t) & np.isfinite(outcome.kernel)
        if fin.any():
            scale = compare.ulp(np.abs(t[fin]), udt)
            self.err_ulps.append(float(np.max(np.abs(outcome.kernel[fin] - t[fin]) / scale)))
            self.oracle_err_ulps.append(float(np.max(np.abs(outcome.oracle[fin] - t[fin]) / scale)))
            first = next((v for v in outcome.inputs.values() if isinstance(v, np.ndarray) and v.dtype != bool), None)
            mags = compare.to_f64(first) if first is not None else t
            mags = np.abs(mags[np.isfinite(mags)])
            self.mag.append(float(mags.max()) if mags.size else 0.0)

    def all_ulps(self) -> np.ndarray:
        a = np.concatenate(self.ulps) if self.ulps else np.zeros(0)
        return a if a.size <= _MAX_SAMPLES else self._rng.choice(a, _MAX_SAMPLES, replace=False)


def plot(op: str, dtype: str, col: Collector, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    b = col.budget
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    u = col.all_ulps()
    ax[0].hist(u, bins=np.arange(0, max(2.0, (u.max() if u.size else 0) + 1.5)) - 0.5, color="tab:blue")
    ax[0].set_yscale("log")
    ax[0].axvline(b.parity.max_ulps, color="red", ls="--", label=f"budget {b.parity.max_ulps:g} ulps")
    ax[0].set(title=f"{op} {dtype}: ulps vs oracle (per element)", xlabel="ulps", ylabel="elements")
    ax[0].legend()
    r = np.asarray(col.ratios)
    ax[1].hist(r, bins=30, color="tab:green")
    ax[1].axvline(b.accuracy.ratio, color="red", ls="--", label=f"budget ratio {b.accuracy.ratio:g}")
    ax[1].set(title="accuracy: needed ratio (per case)", xlabel="(kernel err - floor) / oracle err", ylabel="cases")
    ax[1].legend()
    ax[2].scatter(col.mag, col.err_ulps, s=10, label="kernel", color="tab:blue")
    ax[2].scatter(col.mag, col.oracle_err_ulps, s=10, label="oracle", color="tab:orange", marker="x")
    ax[2].set_xscale("symlog", linthresh=1e-6)
    ax[2].set_yscale("symlog", linthresh=1e-3)
    ax[2].set(title="error vs float64 truth by input magnitude", xlabel="max |input|", ylabel="worst error (ulps)")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out: Path, rows, collectors: dict, *, backend: str, seed: int, examples: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# parity report ({backend}, seed {seed}, {examples} examples per op x dtype)", "",
             "| op | dtype | recipe | n | parity ulps (max / budget) | mismatch % (max / budget) "
             "| accuracy ratio (max / budget) | result |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, bud = r.measured, r.budget

        def pair(k, s=1.0):
            return f"{m[k] * s:.3g} / {bud.get(k, float('nan')) * s:.3g}" if k in m else "-"

        lines.append(f"| {r.op} | {r.dtype} | {r.recipe or '-'} | {r.examples} | {pair('parity.max_ulps')} | "
                     f"{pair('parity.mismatch_frac', 100)} | {pair('accuracy.ratio')} | "
                     f"{'pass' if r.passed else 'FAIL'} |")
    lines.append("")
    for (op, dt), col in collectors.items():
        if col.budget is None:
            continue
        png = out / f"{op}_{dt}.png"
        plot(op, dt, col, png)
        lines += [f"## {op} {dt}", "", f"![{op} {dt}]({png.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
