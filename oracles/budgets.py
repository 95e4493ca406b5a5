"""tolerances.yaml: loading, validation and lookup of the per-op budgets.

Layout (op -> dtype -> backend)::

    rms_norm:                      # an op name from the registry
      bfloat16:                    # float32 | bfloat16 | float16
        cpu:                       # cpu | gpu
          parity:   {max_ulps: 1, mismatch_frac: 0.001, floor_rel: 0.001}
          accuracy: {ratio: 2.0, floor_ulps: 1}
          properties: {row_sum_err: 0.01}      # optional, op-specific exact checks
          recipes:                             # optional per-recipe overrides
            gemma: {parity: {...}, accuracy: {...}}
          provenance: {measured: {...}, examples: 400, seed: 0, date: '2026-11-22',
                       profile: thorough, backend: cpu, versions: {jax: ..., torch: ..., transformers: ...}}

Every number is non-negative; every entry carries provenance. A malformed file fails
with the file, the key path, the line, and what was wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from oracles.compare import AccuracyBudget, ParityBudget
from oracles.strategies import DTYPES

BACKENDS = ("cpu", "gpu")
PARITY_KEYS = ("max_ulps", "mismatch_frac", "floor_rel")
ACCURACY_KEYS = ("ratio", "floor_ulps")
PROVENANCE_KEYS = ("measured", "examples", "seed", "date", "versions")
ENTRY_KEYS = ("parity", "accuracy", "properties", "recipes", "implementations", "provenance")


class BudgetError(ValueError):
    """tolerances.yaml is malformed, or has no budget for what was asked."""


def key_path(op: str, dtype: str, backend: str, implementation: str | None = None) -> str:
    """Where an entry lives in tolerances.yaml: ``op.dtype.backend[.implementations.name]``."""
    return f"{op}.{dtype}.{backend}" + (f".implementations.{implementation}" if implementation else "")


def default_path() -> Path:
    """``$PARITY_TOLERANCES``, else ./tolerances.yaml, else the one beside the package."""
    env = os.environ.get("PARITY_TOLERANCES")
    if env:
        return Path(env)
    here = Path.cwd() / "tolerances.yaml"
    if here.exists():
        return here
    return Path(__file__).resolve().parent.parent / "tolerances.yaml"


@dataclass
class Budget:
    op: str
    dtype: str
    backend: str
    recipe: str | None
    parity: ParityBudget
    accuracy: AccuracyBudget
    properties: dict = field(default_factory=dict)
    key_path: str = ""


def _line(node, key) -> str:
    try:
        return f" (line {node.lc.key(key)[0] + 1})"
    except Exception:  # a plain dict (not from the YAML parser) has no line info
        return ""


class Tolerances:
    """A validated tolerances.yaml. ``lookup(op, dtype, backend, recipe)`` gives a Budget."""

    def __init__(self, data, path: Path, known_ops: tuple[str, ...]):
        self.data = data
        self.path = Path(path)
        self.known_ops = known_ops
        self._validate()

    def _fail(self, keys: list, what: str, node=None, key=None) -> None:
        where = ".".join(str(k) for k in keys) or "<top>"
        line = _line(node, key) if node is not None else ""
        raise BudgetError(f"{self.path}: {where}{line}: {what}")

    def _numbers(self, node, keys: list, required: tuple, *, optional: bool = False) -> None:
        if not isinstance(node, dict):
            self._fail(keys, f"expected a mapping with keys {list(required)}, got {type(node).__name__}")
        for k in required:
            if k not in node:
                if optional:
                    continue
                self._fail(keys + [k], f"missing number (expected keys {list(required)})")
        for k, v in node.items():
            if k not in required:
                self._fail(keys + [k], f"unknown key (expected {list(required)})", node, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self._fail(keys + [k], f"expected a number, got {v!r}", node, k)
            if not v >= 0:
                self._fail(keys + [k], f"must be a non-negative number, got {v!r}", node, k)

    def _validate(self) -> None:
        d = self.data
        if not isinstance(d, dict):
            self._fail([], f"expected a mapping of op names, got {type(d).__name__}")
        for op, by_dtype in d.items():
            if op not in self.known_ops:
                self._fail([op], f"unknown op (known: {list(self.known_ops)})", d, op)
            if not isinstance(by_dtype, dict):
                self._fail([op], "expected a mapping of dtypes", d, op)
            for dt, by_backend in by_dtype.items():
                if dt not in DTYPES:
                    self._fail([op, dt], f"unknown dtype (known: {list(DTYPES)})", by_dtype, dt)
                if not isinstance(by_backend, dict):
                    self._fail([op, dt], "expected a mapping of backends", by_dtype, dt)
                for be, entry in by_backend.items():
                    kp = [op, dt, be]
                    if be not in BACKENDS:
                        self._fail(kp, f"unknown backend (known: {list(BACKENDS)})", by_backend, be)
                    self._validate_entry(entry, kp, top=True)

    def _validate_entry(self, entry, kp: list, *, top: bool) -> None:
        if not isinstance(entry, dict):
            self._fail(kp, "expected a mapping with parity/accuracy/provenance")
        for k in entry:
            allowed = ENTRY_KEYS if top else ("parity", "accuracy", "properties")
            if k not in allowed:
                self._fail(kp + [k], f"unknown key (expected {list(allowed)})", entry, k)
        if top:
            for k in ("parity", "accuracy", "provenance"):
                if k not in entry:
                    self._fail(kp + [k], "missing")
        if "parity" in entry:
            self._numbers(entry["parity"], kp + ["parity"], PARITY_KEYS, optional=not top)
        if "accuracy" in entry:
            self._numbers(entry["accuracy"], kp + ["accuracy"], ACCURACY_KEYS, optional=not top)
        if "properties" in entry:
            props = entry["properties"]
            if not isinstance(props, dict):
                self._fail(kp + ["properties"], "expected a mapping of property budgets")
            self._numbers(props, kp + ["properties"], tuple(props), optional=True)
        for name, sub in (entry.get("recipes") or {}).items():
            self._validate_entry(sub, kp + ["recipes", name], top=False)
        # An implementation with other roundings than the op's (attention's "pallas_flash"):
        # a whole entry of its own, measured on its own sample (its own provenance).
        for name, sub in (entry.get("implementations") or {}).items():
            if not top:
                self._fail(kp + ["implementations"], "only an op/dtype/backend entry may hold implementations")
            self._validate_entry(sub, kp + ["implementations", name], top=True)
        if top:
            prov = entry["provenance"]
            if not isinstance(prov, dict):
                self._fail(kp + ["provenance"], "expected a mapping")
            for k in PROVENANCE_KEYS:
                if k not in prov:
                    self._fail(kp + ["provenance", k], f"missing (provenance needs {list(PROVENANCE_KEYS)})")

    def entry(self, op: str, dtype: str, backend: str, implementation: str | None = None):
        try:
            e = self.data[op][dtype][backend]
            return e if implementation is None else e["implementations"][implementation]
        except (KeyError, TypeError):
            raise BudgetError(f"{self.path}: no budget for {key_path(op, dtype, backend, implementation)}") from None

    def lookup(self, op: str, dtype: str, backend: str = "cpu", recipe: str | None = None, *,
               implementation: str | None = None, measure_only: bool = False) -> Budget:
        """The budget of ``op`` in ``dtype`` on ``backend`` (with ``recipe``'s overrides);
        ``implementation``: that implementation's own entry under ``implementations``.

        ``measure_only`` (``parity tighten`` measuring a backend with no entry yet): a
        budget that judges nothing, with another backend's floors and property names.
        """
        if op not in self.known_ops:
            raise BudgetError(f"unknown op {op!r} (known: {list(self.known_ops)})")
        by_backend = self.data.get(op, {}).get(dtype) or {}
        missing = backend not in by_backend or (
            implementation is not None and implementation not in (by_backend[backend].get("implementations") or {}))
        if measure_only and missing:
            return self._unbounded(op, dtype, backend, recipe)
        e = self.entry(op, dtype, backend, implementation)
        parity, accuracy = dict(e["parity"]), dict(e["accuracy"])
        props = dict(e.get("properties") or {})
        path = key_path(op, dtype, backend, implementation)
        sub = (e.get("recipes") or {}).get(recipe) if recipe else None
        if sub:
            parity.update(sub.get("parity") or {})
            accuracy.update(sub.get("accuracy") or {})
            props.update(sub.get("properties") or {})
            path += f".recipes.{recipe}"
        return Budget(op, dtype, backend, recipe, ParityBudget(**parity), AccuracyBudget(**accuracy), props, path)

    def _unbounded(self, op: str, dtype: str, backend: str, recipe: str | None) -> Budget:
        sibling = next(iter((self.data.get(op, {}).get(dtype) or {}).values()), None) or {}
        floor_rel = (sibling.get("parity") or {}).get("floor_rel", 0.001)
        floor_ulps = (sibling.get("accuracy") or {}).get("floor_ulps", 1)
        inf = float("inf")
        return Budget(op, dtype, backend, recipe, ParityBudget(inf, inf, floor_rel), AccuracyBudget(inf, floor_ulps),
                      _inf_like(sibling.get("properties") or {}), f"{op}.{dtype}.{backend} (measuring: no budget yet)")


def _inf_like(d: dict) -> dict:
    return {k: float("inf") for k in d}


def yaml_rt() -> YAML:
    y = YAML(typ="rt")  # round-trip: comments and key order survive a rewrite
    y.preserve_quotes = True
    y.width = 120
    return y


def load(path: Path | str | None = None, *, known_ops: tuple[str, ...] | None = None) -> Tolerances:
    """Load and validate tolerances.yaml; raise BudgetError naming the file and key path."""
    if known_ops is None:
        from oracles.registry import OP_NAMES

        known_ops = OP_NAMES
    path = Path(path) if path else default_path()
    try:
        text = path.read_text()
    except OSError as e:
        raise BudgetError(f"{path}: cannot read tolerances file: {e}") from None
    try:
        data = yaml_rt().load(text)
    except YAMLError as e:
        raise BudgetError(f"{path}: malformed YAML: {e}") from None
    return Tolerances(data if data is not None else {}, path, known_ops)
