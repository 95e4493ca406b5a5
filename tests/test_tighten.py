"""The budget ratchet: readable rounding, never loosening, comments kept, atomic locked writes."""

from __future__ import annotations

import pytest

from oracles import budgets, tighten
from oracles.sweep import Row

TEXT = """\
# top comment survives
rms_norm:
  bfloat16:
    cpu:
      # entry comment survives
      parity: {max_ulps: 4, mismatch_frac: 0.01, floor_rel: 0.001}
      accuracy: {ratio: 3.0, floor_ulps: 1}
      recipes:
        gemma: {parity: {max_ulps: 2}}
      provenance: {measured: {}, examples: 10, seed: 0, date: '2000-01-01', versions: {}}
"""


def _tol(tmp_path, text=TEXT):
    p = tmp_path / "tolerances.yaml"
    p.write_text(text)
    return budgets.load(p)


def _row(recipe, max_ulps, frac, ratio, examples=10):
    r = Row("rms_norm", "bfloat16", recipe, examples=examples)
    r.measured = {"parity.max_ulps": max_ulps, "parity.mismatch_frac": frac, "accuracy.ratio": ratio,
                  "finite.nonfinite": 0.0}
    return r


@pytest.mark.parametrize("v, expected", [(0, 0), (0.9, 1), (1.0, 1), (1.01, 1.2), (2.6, 3), (7, 8), (8.5, 10),
                                         (0.0013, 0.0015), (3.7e-7, 4e-7)])
def test_readable_ceiling(v, expected):
    assert tighten.readable_ceiling(v) == pytest.approx(expected)


def test_tightens_base_and_recipe_override_separately(tmp_path):
    tol = _tol(tmp_path)
    ch = tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5), _row("gemma", 0.0, 0.0, 0.2)], backend="cpu",
                            margin=1.25, allow_loosen=False, seed=0)
    e = tol.data["rms_norm"]["bfloat16"]["cpu"]
    assert e["parity"]["max_ulps"] == 2  # 1 x 1.25 -> 1.5 -> whole ulps: 2
    assert e["parity"]["mismatch_frac"] == pytest.approx(0.0015)
    assert e["recipes"]["gemma"]["parity"]["max_ulps"] == 0  # bit-exact stays bit-exact
    assert e["accuracy"]["ratio"] == 1.0  # never below "as accurate as the oracle"
    assert {c.action for c in ch} == {"tighten"}


def test_never_loosens_without_permission_and_says_why(tmp_path):
    tol = _tol(tmp_path)
    ch = tighten.apply_rows(tol, [_row("hf", 9.0, 0.001, 0.5)], backend="cpu", margin=1.25,
                            allow_loosen=False, seed=0)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["parity"]["max_ulps"] == 4
    refused = [c for c in ch if c.action == "refused"]
    assert len(refused) == 1 and "breach" in refused[0].line()
    tighten.apply_rows(tol, [_row("hf", 9.0, 0.001, 0.5)], backend="cpu", margin=1.25,
                       allow_loosen=True, seed=0)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["parity"]["max_ulps"] == 12  # 9 x 1.25 = 11.25 -> 12


def test_smaller_sample_cannot_tighten(tmp_path):
    tol = _tol(tmp_path)
    tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5, examples=5)], backend="cpu", margin=1.25,
                       allow_loosen=False, seed=0)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["parity"]["max_ulps"] == 4


def test_written_file_keeps_comments_and_reloads_and_second_run_is_a_fixed_point(tmp_path):
    tol = _tol(tmp_path)
    rows = [_row("hf", 1.0, 0.001, 0.5)]
    tighten.apply_rows(tol, rows, backend="cpu", margin=1.25, allow_loosen=False, seed=0)
    tighten.write_atomic(tol.path, tighten.dump(tol.data))
    text1 = tol.path.read_text()
    assert "# top comment survives" in text1 and "# entry comment survives" in text1
    tol2 = budgets.load(tol.path)  # still valid
    ch = tighten.apply_rows(tol2, rows, backend="cpu", margin=1.25, allow_loosen=False, seed=0)
    assert {c.action for c in ch} == {"keep"}
    tighten.write_atomic(tol2.path, tighten.dump(tol2.data))
    assert tol2.path.read_text() == text1  # same day: identical


def test_new_backend_entry_is_created_with_provenance(tmp_path):
    tol = _tol(tmp_path)
    ch = tighten.apply_rows(tol, [_row("hf", 2.0, 0.01, 1.5)], backend="gpu", margin=1.25, allow_loosen=False, seed=0)
    assert {c.action for c in ch} == {"new"}
    e = tol.data["rms_norm"]["bfloat16"]["gpu"]
    assert e["parity"]["max_ulps"] == 3 and e["provenance"]["backend"] == "gpu"
    budgets.Tolerances(tol.data, tol.path, tol.known_ops)  # validates


def test_failed_write_leaves_the_original_intact(tmp_path, monkeypatch):
    tol = _tol(tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tighten.os, "replace", boom)
    with pytest.raises(OSError):
        tighten.write_atomic(tol.path, "garbage")
    assert tol.path.read_text() == TEXT
    assert [p.name for p in tmp_path.iterdir()] == ["tolerances.yaml"]  # no temporary left behind


def test_second_concurrent_run_is_refused(tmp_path):
    tol = _tol(tmp_path)
    with tighten.locked(tol.path):
        with pytest.raises(budgets.BudgetError, match="another 'parity tighten'"):
            with tighten.locked(tol.path):
                pass


V = {"jax": "1", "torch": "2"}
RECORDED = TEXT.replace(
    "provenance: {measured: {}, examples: 10, seed: 0, date: '2000-01-01', versions: {}}",
    "provenance: {measured: {hf: {max_ulps: 3.0, mismatch_frac: 0.001, ratio: 0.5}}, examples: 10, seed: 0,\n"
    "                   date: '2000-01-01', backend: cpu, versions: {jax: '1', torch: '2'}}")


@pytest.mark.parametrize("fresh, versions, max_ulps, examples", [
    (False, V, 4, 30),  # folded: the recorded 3 ulps x 1.25 -> 4 holds the budget
    (True, V, 2, 20),  # --fresh: the new sample alone, 1 ulp x 1.25 -> 2
    (False, {"jax": "9", "torch": "2"}, 2, 20),  # other versions: the record describes other code
])
def test_a_new_sample_cannot_tighten_below_the_recorded_one(tmp_path, fresh, versions, max_ulps, examples):
    tol = _tol(tmp_path, RECORDED)
    tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5, examples=20)], backend="cpu", margin=1.25,
                       allow_loosen=False, seed=1, fresh=fresh, versions_now=versions)
    e = tol.data["rms_norm"]["bfloat16"]["cpu"]
    assert e["parity"]["max_ulps"] == max_ulps
    assert e["provenance"]["examples"] == examples
    assert e["provenance"]["measured"]["hf"]["max_ulps"] == (3.0 if max_ulps == 4 else 1.0)


def test_the_same_draws_again_add_no_examples(tmp_path):
    tol = _tol(tmp_path, RECORDED)
    tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5, examples=10)], backend="cpu", margin=1.25,
                       allow_loosen=False, seed=0, versions_now=V)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["provenance"]["examples"] == 10


def test_a_note_in_the_provenance_survives(tmp_path):
    tol = _tol(tmp_path, RECORDED.replace("backend: cpu,", "backend: cpu, note: 'set by hand: why',"))
    tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5, examples=20)], backend="cpu", margin=1.25,
                       allow_loosen=False, seed=1, fresh=True, versions_now=V)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["provenance"]["note"] == "set by hand: why"


def test_an_implementation_gets_its_own_entry_and_provenance(tmp_path):
    """Rows of an implementation land in implementations.<name> (created with the op's
    floors, no property budgets), and never touch the op's own numbers."""
    tol = _tol(tmp_path)
    r = _row(None, 30.0, 0.3, 1.1)
    r.implementation = "fast"
    ch = tighten.apply_rows(tol, [r], backend="cpu", margin=1.25, allow_loosen=False, seed=0)
    assert {c.action for c in ch} == {"new"}
    assert all(".implementations.fast." in c.key_path for c in ch)
    e = tol.data["rms_norm"]["bfloat16"]["cpu"]
    assert e["parity"]["max_ulps"] == 4  # the op's own budget untouched
    sub = e["implementations"]["fast"]
    assert sub["parity"]["max_ulps"] == 40 and sub["accuracy"]["ratio"] == 1.5
    assert sub["provenance"]["examples"] == 10 and "properties" not in sub
    budgets.Tolerances(tol.data, tol.path, tol.known_ops)  # validates
    with pytest.raises(budgets.BudgetError, match="measure the op itself before its implementation"):
        tighten.apply_rows(tol, [r], backend="gpu", margin=1.25, allow_loosen=False, seed=0)


def test_committed_file_is_in_the_form_tighten_writes():
    """tolerances.yaml is byte for byte what ``parity tighten`` would write back unchanged:
    a budget rewrite then changes only the numbers it moves, never the wrapping of a
    provenance note written by hand (a re-wrapped note made every tighten diff noisy)."""
    text = budgets.default_path().read_text()
    again = tighten.dump(budgets.yaml_rt().load(text))
    if again != text:
        have, want = text.splitlines() + [""], again.splitlines() + [""]  # "": past the end
        first = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), len(have) - 1)  # else: the end
        raise AssertionError(f"tolerances.yaml line {first + 1} is not in tighten's form (ruamel, width 120); "
                             f"write it as tighten would:\n  file:    {have[first]!r}\n  written: {want[first]!r}")


def test_tighten_measures_nothing_where_the_implementation_cannot_run(tmp_path, monkeypatch, capsys):
    """`parity tighten --implementation cudnn` on a backend without cuDNN names each row it
    could not measure and refuses to write, instead of writing an empty or CPU budget."""
    from oracles import cli, registry

    path = tmp_path / "tolerances.yaml"
    path.write_text(budgets.default_path().read_text())
    monkeypatch.setattr(registry, "backend", lambda: "cpu")  # the same answer on a GPU machine
    with pytest.raises(SystemExit, match=r"nothing to measure on cpu .* not written"):
        cli.main(["tighten", "--ops", "attention", "--implementation", "cudnn", "--examples", "1",
                  "--tolerances", str(path)])
    out = capsys.readouterr().out
    assert "attention/bfloat16/fp32_logits@cudnn: not measured on cpu (gpu only, needs cuDNN)" in out
    assert path.read_text() == budgets.default_path().read_text()


# --- the sample a budget rests on: every cell of the op's vocabulary ---------------------

# What pins a case to its cell (Harness.strata), per op: its recipe (or family) and the
# reduction length(s) the cell fixes.
CELL_KEY = {
    "projection": lambda c: (c.recipe, c.shapes["x"], tuple(sorted(c.shapes["w"]))),
    "rms_norm": lambda c: (c.recipe, c.shapes["x"][-1]),
    "attention": lambda c: (c.recipe, c.shapes["q"][1], c.shapes["k"][1]),
    "swiglu": lambda c: (c.recipe, c.shapes["w_gate"]),
    "softmax": lambda c: c.shapes["x"][1],
    "qwen2": lambda c: c.data["family"],
}


@pytest.mark.parametrize("op, implementation", [("projection", None), ("projection", "mosaic"), ("rms_norm", None),
                                                ("attention", None), ("attention", "mosaic_flash"), ("swiglu", None),
                                                ("softmax", None), ("qwen2", None)])
def test_a_sweep_covers_every_cell_evenly(monkeypatch, op, implementation):
    """A sweep splits its examples evenly over the op's cells (one recipe and reduction
    length each), every cell at least once, and each cell's cases are that cell's: so a
    budget rests on every shape of the vocabulary. Hypothesis alone, over 60 examples,
    drew 14 of the mosaic projection's 32 (recipe, shape) cells, 19 examples in one: a
    budget tightened on that sample failed the first test that drew float32 logits at D = 896."""
    from oracles import registry
    from oracles import sweep as sw

    cells: list[list] = []
    real = sw._run_cell
    monkeypatch.setattr(sw, "_run_cell", lambda *a, run, **k: (cells.append([]), real(*a, run=run, **k)))
    monkeypatch.setattr(sw, "_one", lambda case, *a, **k: cells[-1].append(case))  # draw, run nothing
    monkeypatch.setattr(registry.Implementation, "why_not", lambda *a: "")  # as on a Hopper GPU
    sw.sweep(op, "bfloat16", examples=60, seed=0, tolerances=None, backend="gpu", implementation=implementation)
    plan = sw.plan(op, 60, implementation=implementation)
    assert len(cells) == len(plan) > 1 and [len(c) for c in cells] == [n for _, n in plan]
    n = [len(c) for c in cells]
    assert min(n) >= 1 and max(n) - min(n) <= 1 and sum(n) >= round(60 * registry.harness(op).examples_scale)
    keys = [{CELL_KEY[op](c) for c in cell} for cell in cells]
    assert all(len(k) == 1 for k in keys), f"a cell drew cases of other cells: {[k for k in keys if len(k) > 1]}"
    assert len(set().union(*keys)) == len(cells), "two cells drew the same cases"


def test_plan_keeps_what_an_implementation_pins():
    """An implementation's case_opts narrow the cells: mosaic_flash's one recipe and its
    own (T, S) pairs, not the op's."""
    from oracles.attention import MOSAIC_FLASH_CASES
    from oracles.sweep import plan

    got = plan("attention", 20, implementation="mosaic_flash")
    assert [(o["recipe"], o["ts_pairs"]) for o, _ in got] == [("fp32_logits", (p,)) for p in MOSAIC_FLASH_CASES["ts_pairs"]]
    assert all(o["q_chunk"] == 0 for o, _ in got)  # the rest of case_opts kept
    assert plan("embedding", 7) == [({}, 7)]  # no strata: one cell, hypothesis draws everything


def test_a_sample_over_other_cells_is_other_draws(tmp_path):
    """The same seed and size split over other cells (an unstratified sample recorded
    before strata existed) are new draws: their examples add up; ``cells`` is recorded."""
    tol = _tol(tmp_path, RECORDED)
    r = _row("hf", 1.0, 0.001, 0.5, examples=10)
    r.cells = 24
    tighten.apply_rows(tol, [r], backend="cpu", margin=1.25, allow_loosen=False, seed=0, versions_now=V)
    prov = tol.data["rms_norm"]["bfloat16"]["cpu"]["provenance"]
    assert prov["examples"] == 20 and prov["cells"] == 24


def test_a_gradient_provenance_survives(tmp_path):
    """`parity gradients --write` records grad_ratio's own sample as provenance.gradient; a
    forward tighten, which rewrites the provenance, keeps it (as it keeps a note)."""
    grad = "gradient: {measured: 0.5, input: x, examples: 60, seed: 0, date: '2000-01-01'},"
    tol = _tol(tmp_path, RECORDED.replace("backend: cpu,", f"backend: cpu, {grad}"))
    tighten.apply_rows(tol, [_row("hf", 1.0, 0.001, 0.5, examples=20)], backend="cpu", margin=1.25,
                       allow_loosen=False, seed=1, fresh=True, versions_now=V)
    assert tol.data["rms_norm"]["bfloat16"]["cpu"]["provenance"]["gradient"]["measured"] == 0.5


def test_gradients_write_sets_grad_ratio_with_its_provenance_and_never_loosens(tmp_path, monkeypatch):
    from oracles import cli, registry

    monkeypatch.setattr(registry, "backend", lambda: "cpu")  # the same entries on a GPU machine
    data = budgets.yaml_rt().load(budgets.default_path().read_text())
    from ruamel.yaml.comments import CommentedMap

    (data["rms_norm"]["bfloat16"]["cpu"].get("properties") or {}).pop("grad_ratio", None)
    data["rms_norm"]["bfloat16"]["cpu"]["provenance"].pop("gradient", None)
    data["rms_norm"]["float16"]["cpu"].setdefault("properties", CommentedMap())["grad_ratio"] = 1e-9  # below any
    data["rms_norm"]["float16"]["cpu"]["provenance"].pop("gradient", None)
    path = tmp_path / "tolerances.yaml"
    path.write_text(tighten.dump(data))
    rc = cli.main(["gradients", "--ops", "rms_norm", "--dtypes", "bfloat16", "float16", "--examples", "2",
                   "--write", "--tolerances", str(path), "--out", str(tmp_path / "g.json")])
    assert rc == cli.EXIT_BREACH  # float16 measured above its budget
    e = budgets.load(path).data["rms_norm"]
    written = e["bfloat16"]["cpu"]
    assert written["properties"]["grad_ratio"] > 0
    prov = written["provenance"]["gradient"]
    assert prov["examples"] == 2 and prov["backend"] == "cpu" and prov["command"] == "parity gradients"
    assert prov["input"] in ("x", "weight") and prov["measured"] * 1.25 <= written["properties"]["grad_ratio"]
    assert e["float16"]["cpu"]["properties"]["grad_ratio"] == 1e-9  # not loosened
    assert "gradient" not in e["float16"]["cpu"]["provenance"]
