"""``parity tighten``: measure, propose ``budget = measured x margin``, write tolerances.yaml back.

The ratchet:
- each number a sweep measures (parity.max_ulps, parity.mismatch_frac, accuracy.ratio,
  properties.*) is proposed as ``measured x margin`` rounded *up* to a readable value
  (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k; ulps to whole numbers; a bit-exact 0
  stays 0; an accuracy ratio never below 1, "as accurate as the oracle");
- a proposal below the current budget tightens it; one above it is refused (the entry
  keeps its budget and is reported as a breach) unless ``allow_loosen``, and then the
  change is printed with its reason;
- numbers a sweep does not measure (floor_rel, floor_ulps) are left as they are;
- per-recipe overrides are tightened in place; the base entry takes the worst of the
  recipes that use it;
- evidence accumulates: when the entry's provenance was measured on the same backend with
  the same library versions, the new sample is folded into it (each measured number is
  the worst of both, ``examples`` their sum; a rerun of the very same sample, the same
  seed and size, adds nothing), so a new draw that happens to miss a rare case cannot
  tighten a budget below what an earlier sample measured. ``fresh=True`` (``--fresh``)
  drops the recorded sample: after a kernel change, when it no longer describes the code;
- provenance is refreshed (measured, examples, seed, cells: the strata the sweep split its
  examples over, date, profile, backend, versions);
  its ``note``, a person's why, is kept;
- the file is written back with ruamel's round-trip mode (comments and key order kept),
  atomically (temporary file in the same folder, flush, fsync, rename), under an
  exclusive lock so that two runs cannot interleave.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from oracles.budgets import BudgetError, Tolerances, key_path, yaml_rt
from oracles.sweep import Row

READABLE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
# measure name (as sweep.Row reports it) -> (section, key) in an entry
MEASURES = {
    "parity.max_ulps": ("parity", "max_ulps"),
    "parity.mismatch_frac": ("parity", "mismatch_frac"),
    "accuracy.ratio": ("accuracy", "ratio"),
}


def readable_ceiling(v: float) -> float:
    """The smallest readable value >= v (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k)."""
    if v <= 0:
        return 0.0
    if not math.isfinite(v):
        return v
    k = math.floor(math.log10(v))
    for m in READABLE:
        c = m * 10.0**k
        if c >= v * (1 - 1e-12):
            return float(f"{c:.6g}")
    return float(f"{10.0 ** (k + 1):.6g}")


def propose(measure: str, measured: float, margin: float) -> float:
    if measured == 0 and measure != "accuracy.ratio":
        return 0.0  # bit-exact stays bit-exact
    v = measured * margin
    if measure == "parity.max_ulps":
        return float(math.ceil(readable_ceiling(v)))
    if measure == "parity.mismatch_frac":
        return min(1.0, readable_ceiling(v))
    if measure == "accuracy.ratio":
        return max(1.0, readable_ceiling(v))
    return readable_ceiling(v)


@dataclass
class Change:
    key_path: str
    old: float | None
    new: float
    measured: float
    action: str  # "tighten" | "keep" | "loosen" | "refused" | "new"

    def line(self) -> str:
        old = "-" if self.old is None else f"{self.old:g}"
        why = {"refused": "  (measured above budget: breach; --allow-loosen to accept)",
               "loosen": "  (loosened: measured above the old budget)"}.get(self.action, "")
        return f"{self.key_path}: {old} -> {self.new:g}  [measured {self.measured:.4g}, {self.action}]{why}"


def versions() -> dict:
    import jax
    import jaxlib
    import numpy
    import torch
    import transformers

    return {"jax": str(jax.__version__), "jaxlib": str(jaxlib.__version__), "torch": str(torch.__version__),
            "transformers": str(transformers.__version__), "numpy": str(numpy.__version__)}


def _section(node, name):
    from ruamel.yaml.comments import CommentedMap

    if name not in node or node[name] is None:
        node[name] = CommentedMap()
    return node[name]


def _worst(new: float, old) -> float:
    """The worse of a new and a recorded measurement (a recorded NaN or none: the new one)."""
    if old is None or math.isnan(float(old)):
        return new
    return new if math.isnan(new) else max(new, float(old))


def _fold_recorded(rows, recorded, props: set):
    """Copies of ``rows`` whose measurements also hold the recorded ones (``provenance.measured``:
    per recipe, or at the top level for a row without one)."""
    out = []
    for r in rows:
        old = (recorded.get(r.recipe) if r.recipe else recorded) or {}
        folded = Row(r.op, r.dtype, r.recipe, examples=r.examples, implementation=r.implementation, cells=r.cells)
        folded.measured = {m: (_worst(v, old.get(_target(m, props)[1])) if _target(m, props) else v)
                           for m, v in r.measured.items()}
        out.append(folded)
    return out


def apply_rows(tol: Tolerances, rows, *, backend: str, margin: float, allow_loosen: bool,
               seed: int, profile: str = "parity tighten", fresh: bool = False,
               versions_now: dict | None = None) -> list[Change]:
    """Fold sweep rows (one per op/dtype/recipe) into ``tol.data`` in place; return the changes.

    ``versions_now``: the library versions the rows were measured with (default: this
    process's, :func:`versions`); a recorded sample of other versions is not folded in.
    """
    from ruamel.yaml.comments import CommentedMap

    versions_now = dict(versions() if versions_now is None else versions_now)
    changes: list[Change] = []
    by_entry: dict[tuple[str, str, str | None], list] = {}
    for r in rows:
        by_entry.setdefault((r.op, r.dtype, r.implementation), []).append(r)
    for (op, dt, impl), rs in by_entry.items():
        by_dtype = _section(_section(tol.data, op), dt)
        if impl is None:
            holder, name, where = by_dtype, backend, key_path(op, dt, backend)
            sibling = next(iter(by_dtype.values()), {}) or {}
        else:  # an implementation's own entry, beside the op's budgets on this backend
            if backend not in by_dtype:
                raise BudgetError(f"{op}.{dt}.{backend}: measure the op itself before its implementation {impl!r}")
            holder, name = _section(by_dtype[backend], "implementations"), impl
            where = key_path(op, dt, backend, impl)
            sibling = by_dtype[backend]
        created = name not in holder
        if created:
            # A first budget on a new backend (or a new implementation): the same property
            # checks as a sibling entry, every measured number new.
            holder[name] = CommentedMap(
                parity=CommentedMap(max_ulps=0, mismatch_frac=0.0,
                                    floor_rel=(sibling.get("parity") or {}).get("floor_rel", 0.001)),
                accuracy=CommentedMap(ratio=1.0, floor_ulps=(sibling.get("accuracy") or {}).get("floor_ulps", 1)))
            if sibling.get("properties") and impl is None:  # an implementation has no property budgets of its own
                holder[name]["properties"] = CommentedMap((k, 0.0) for k in sibling["properties"])
        entry = holder[name]
        examples = sum(r.examples for r in rs)  # the cases this entry's numbers rest on
        cells = max(r.cells for r in rs)  # the strata this sample was split over (sweep.plan)
        prev = entry.get("provenance") or {}
        prev_examples = prev.get("examples", 0) or 0
        overrides = entry.get("recipes") or {}
        props = set(entry.get("properties") or {})
        if (not created and not fresh and prev.get("backend") == backend
                and dict(prev.get("versions") or {}) == versions_now):
            # The recorded sample is evidence about this same code and backend: keep it.
            rs = _fold_recorded(rs, prev.get("measured") or {}, props)
            if not (prev.get("seed") == seed and prev_examples == examples
                    and prev.get("cells", 1) == cells):  # else the very same draws
                examples += prev_examples
        # A smaller sample than the one a budget was measured on has seen fewer rare
        # events (rounding ties): it may confirm a budget but not tighten it.
        may_tighten = created or examples >= prev_examples
        measures = sorted({m for r in rs for m in r.measured if _target(m, props)})
        for m in measures:
            section, key = _target(m, props)
            base_worst = None
            for r in rs:
                if m not in r.measured:
                    continue
                ov = overrides.get(r.recipe) if r.recipe else None
                if ov is not None and key in (ov.get(section) or {}):
                    node = ov[section]
                    path = f"{where}.recipes.{r.recipe}.{section}.{key}"
                    changes.append(_ratchet(node, key, r.measured[m], m, margin, allow_loosen, path, created,
                                           may_tighten))
                else:
                    base_worst = r.measured[m] if base_worst is None else max(base_worst, r.measured[m])
            if base_worst is not None:
                node = _section(entry, section)
                path = f"{where}.{section}.{key}"
                changes.append(_ratchet(node, key, base_worst, m, margin, allow_loosen, path, created, may_tighten))
        measured = CommentedMap()
        for r in sorted(rs, key=lambda r: str(r.recipe)):
            vals = CommentedMap((_target(k, props)[1], float(f"{v:.4g}"))
                                for k, v in sorted(r.measured.items()) if _target(k, props))
            if r.recipe:
                measured[r.recipe] = vals
            else:
                measured.update(vals)
        if not may_tighten:
            continue  # the provenance still describes the larger sample the budgets rest on
        entry["provenance"] = CommentedMap(
            measured=measured, examples=examples, seed=seed, cells=cells,
            date=_dt.date.today().isoformat(), profile=profile, backend=backend, versions=CommentedMap(versions_now))
        if prev.get("note"):  # a person's why (a budget set by hand, a past loosening) outlives the numbers
            entry["provenance"]["note"] = prev["note"]
        if prev.get("gradient"):  # grad_ratio's own sample (`parity gradients --write`), not this sweep's
            entry["provenance"]["gradient"] = prev["gradient"]
    return changes


def _target(measure: str, props: set) -> tuple[str, str] | None:
    """Where a measured value lives in an entry: (section, key), or None if not budgeted."""
    if measure in MEASURES:
        return MEASURES[measure]
    key = measure.split(".", 1)[1]
    return ("properties", key) if key in props else None


def _ratchet(node, key, measured, measure, margin, allow_loosen, path, created, may_tighten=True) -> Change:
    old = node.get(key)
    new = propose(measure, measured, margin)
    if old is None or created:
        node[key] = _num(new)
        return Change(path, None, new, measured, "new")
    if new < old and not may_tighten:
        return Change(path, old, old, measured, "keep")
    if new < old:
        node[key] = _num(new)
        return Change(path, old, new, measured, "tighten")
    if measured <= old:
        return Change(path, old, old, measured, "keep")  # within budget: never loosen
    if allow_loosen:
        node[key] = _num(new)
        return Change(path, old, new, measured, "loosen")
    return Change(path, old, old, measured, "refused")


def _num(v: float):
    return int(v) if float(v).is_integer() and v >= 1 else v


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path``; a second concurrent tighten fails at once."""
    lock = Path(str(path) + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BudgetError(f"{path}: another 'parity tighten' holds {lock}; try again when it is done") from None
        yield
    finally:
        os.close(fd)


def dump(data) -> str:
    buf = io.StringIO()
    yaml_rt().dump(data, buf)
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
