"""``parity``: the command-line face of the oracle side.

  parity check    sweep op x dtype (x recipe), print worst measures against tolerances.yaml;
                  exit 1 on any breach
  parity mutants  swap each registered bug class in for the real kernel, run that op's
                  tests, print killed / survived; exit 1 if any survives
  parity repro    rerun one case from the JSON a failure printed, and show every judgment
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXIT_BREACH = 1
EXIT_USAGE = 2


def _ops(arg: list[str] | None) -> list[str]:
    from oracles.registry import OP_NAMES

    if not arg:
        return list(OP_NAMES)
    names = [n for a in arg for n in a.split(",") if n]
    unknown = [n for n in names if n not in OP_NAMES]
    if unknown:
        raise SystemExit(f"parity: unknown op(s) {unknown}; known ops: {list(OP_NAMES)}")
    return names


def _dtypes(arg: list[str] | None) -> list[str]:
    from oracles.strategies import DTYPES

    if not arg:
        return list(DTYPES)
    names = [n for a in arg for n in a.split(",") if n]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"parity: unknown dtype(s) {unknown}; known dtypes: {list(DTYPES)}")
    return names


def _implementations(op: str) -> list[str]:
    """The op's registered implementations with their own budgets (attention: pallas_flash)."""
    from oracles.registry import harness

    return sorted(harness(op).implementations)


def _planned(op: str, examples: int, implementation: str | None = None) -> int:
    """The cases a sweep of ``op`` runs for one dtype (its cells, evenly; progress bars)."""
    from oracles.sweep import plan

    return sum(n for _, n in plan(op, examples, implementation=implementation))


def _load_tolerances(path):
    from oracles import budgets

    try:
        return budgets.load(path)
    except budgets.BudgetError as e:
        raise SystemExit(f"parity: {e}") from None


def _console():
    from rich.console import Console

    c = Console()
    # Piped output (CI logs) would wrap the tables at 80 columns: give them room.
    return c if c.is_terminal else Console(width=160)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}"
    return str(v)


def cmd_check(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from oracles.jaxsetup import configure_jax
    from oracles.registry import backend
    from oracles.sweep import sweep

    configure_jax()
    tol = _load_tolerances(args.tolerances)
    ops, dts = _ops(args.ops), _dtypes(args.dtypes)
    console = _console()
    rows = []
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True, disable=args.json) as prog:
        task = prog.add_task("sweeping", total=len(dts) * sum(_planned(op, args.examples, impl) for op in ops
                                                              for impl in (None, *_implementations(op))))
        for op in ops:
            for impl in (None, *_implementations(op)):  # the op, then each of its other implementations
                for dt in dts:
                    prog.update(task, description=f"{op} {dt}" + (f" ({impl})" if impl else ""))
                    got = sweep(op, dt, examples=args.examples, seed=args.seed, tolerances=tol,
                                on_case=lambda *_: prog.advance(task), implementation=impl)
                    rows.extend(got[k] for k in sorted(got, key=str))
    elapsed = time.perf_counter() - t0
    breach = any(not r.passed for r in rows)
    if args.json:
        print(json.dumps({"backend": backend(), "seed": args.seed, "examples": args.examples, "elapsed_s": elapsed,
                          "passed": not breach,
                          "rows": [{"op": r.op, "dtype": r.dtype, "recipe": r.recipe,
                                    "implementation": r.implementation, "examples": r.examples,
                                    "failures": r.failures, "measured": r.measured, "budget": r.budget,
                                    "first_failure": r.first_failure, "not_run": r.not_run} for r in rows]},
                         indent=1))
        return EXIT_BREACH if breach else 0
    table = Table(title=f"parity check: {backend()}, seed {args.seed}, {args.examples} examples per op x dtype")
    for col in ("op", "dtype", "recipe", "n", "parity ulps", "mismatch %", "accuracy ratio", "other", "result"):
        table.add_column(col, justify="right" if col not in ("op", "dtype", "recipe", "other") else "left")
    for r in rows:
        m, b = r.measured, r.budget

        def pair(key, scale=1.0):
            if key not in m:
                return "-"
            return f"{_fmt(m[key] * scale)} / {_fmt(b.get(key, float('nan')) * scale)}"

        other = [f"{k} {_fmt(v)}/{_fmt(b.get(k))}" for k, v in m.items()
                 if not k.startswith(("parity.", "accuracy.")) and k in b and b.get(k) != 0]
        bad_kinds = [k for k, ok in r.ok.items() if not ok]
        recipe = (r.recipe or "-") + (f" @{r.implementation}" if r.implementation else "")
        result = ("[green]pass[/]" if r.passed else f"[red]FAIL[/] ({', '.join(bad_kinds)})") if not r.not_run \
            else f"[yellow]not run[/] ({r.not_run})"
        table.add_row(r.op, r.dtype, recipe, str(r.examples), pair("parity.max_ulps"),
                      pair("parity.mismatch_frac", 100), pair("accuracy.ratio"), "; ".join(other), result)
    console.print(table)
    idle = sum(bool(r.not_run) for r in rows)
    console.print(f"measured / budget; {len(rows)} rows" + (f" ({idle} not run on {backend()})" if idle else "")
                  + f" in {elapsed:.1f} s; tolerances: {tol.path}")
    for r in rows:
        if not r.passed:
            console.print(f"\n[red]{r.key}: {r.failures} of {r.examples} cases over budget; first:[/]")
            console.print(r.first_failure, markup=False, highlight=False)
    return EXIT_BREACH if breach else 0


def cmd_tighten(args) -> int:
    from rich.progress import Progress

    from oracles import tighten
    from oracles.budgets import BudgetError
    from oracles.jaxsetup import configure_jax
    from oracles.registry import backend
    from oracles.sweep import sweep

    configure_jax()
    tol = _load_tolerances(args.tolerances)
    ops, dts = _ops(args.ops), _dtypes(args.dtypes)
    be = backend()
    if args.implementation:
        bad = [op for op in ops if args.implementation not in _implementations(op)]
        if bad:
            raise SystemExit(f"parity tighten: --implementation {args.implementation}: not an implementation of "
                             f"{bad} (pass --ops with an op that has it)")
    try:
        with tighten.locked(tol.path):
            tol = _load_tolerances(tol.path)  # re-read under the lock: another run may have written it
            rows = []
            with Progress(transient=True) as prog:
                task = prog.add_task("measuring", total=len(dts) * sum(_planned(op, args.examples, args.implementation)
                                                                      for op in ops))
                for op in ops:
                    for dt in dts:
                        prog.update(task, description=f"{op} {dt}")
                        got = sweep(op, dt, examples=args.examples, seed=args.seed, tolerances=tol, backend=be,
                                    on_case=lambda *_: prog.advance(task), measure_only=True,
                                    implementation=args.implementation)
                        rows.extend(got.values())
            for r in rows:
                if r.not_run:
                    print(f"{r.key}: not measured on {be} ({r.not_run})")
            rows = [r for r in rows if not r.not_run]
            if not rows:
                raise SystemExit(f"parity tighten: nothing to measure on {be} (see above); tolerances.yaml not written")
            changes = tighten.apply_rows(tol, rows, backend=be, margin=args.margin, allow_loosen=args.allow_loosen,
                                         seed=args.seed, profile=args.profile, fresh=args.fresh)
            for c in changes:
                print(c.line())
            refused = [c for c in changes if c.action == "refused"]
            n = {a: sum(c.action == a for c in changes) for a in ("tighten", "loosen", "new", "keep", "refused")}
            print(f"{n['tighten']} tightened, {n['loosen']} loosened, {n['new']} new, {n['keep']} kept, "
                  f"{n['refused']} refused (breaches)")
            if args.dry_run:
                print("dry run: tolerances.yaml not written")
            else:
                try:
                    tighten.write_atomic(tol.path, tighten.dump(tol.data))
                except OSError as e:
                    raise SystemExit(f"parity tighten: could not write {tol.path} ({e}); the original is intact") from None
                print(f"wrote {tol.path}")
    except BudgetError as e:
        raise SystemExit(f"parity tighten: {e}") from None
    return EXIT_BREACH if refused else 0


def cmd_report(args) -> int:
    from rich.progress import Progress

    from oracles.jaxsetup import configure_jax
    from oracles.registry import backend
    from oracles.report import Collector, write_report
    from oracles.sweep import sweep

    configure_jax()
    tol = _load_tolerances(args.tolerances)
    ops, dts = _ops(args.ops), _dtypes(args.dtypes)
    rows, cols = [], {}
    with Progress(transient=True) as prog:
        task = prog.add_task("measuring", total=len(dts) * sum(_planned(op, args.examples) for op in ops))
        for op in ops:
            for dt in dts:
                col = cols[(op, dt)] = Collector(args.seed)

                def on_case(*a, col=col):
                    col(*a)
                    prog.advance(task)

                got = sweep(op, dt, examples=args.examples, seed=args.seed, tolerances=tol, on_case=on_case)
                rows.extend(got[k] for k in sorted(got, key=str))
    md = write_report(Path(args.out), rows, cols, backend=backend(), seed=args.seed, examples=args.examples)
    print(f"wrote {md} and {len(cols)} plots")
    return 0


def cmd_diverge(args) -> int:
    from oracles import diverge
    from oracles.jaxsetup import configure_jax

    configure_jax()
    tol = _load_tolerances(args.tolerances)
    try:
        inject = diverge.parse_inject(args.inject)
        hf_config = None if args.checkpoint else diverge.preset(args.config, layers=args.layers)
    except ValueError as e:
        raise SystemExit(f"parity diverge: {e}") from None
    modes = ("isolated", "accumulated") if args.mode == "both" else (args.mode,)
    source = args.checkpoint or args.config
    reports = diverge.run(source=source, hf_config=hf_config, checkpoint=args.checkpoint, dtype=args.dtype,
                          tokens=args.tokens, batch=args.batch, seed=args.seed, modes=modes, inject=inject,
                          tolerances=tol)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    diverge.print_reports(reports, _console())
    diverge.write_json(reports, out / "diverge.json")
    diverge.plot(reports, out / "diverge.png")
    print(f"wrote {out / 'diverge.json'} and {out / 'diverge.png'}")
    # Isolated mode decides the exit status when it ran: in accumulated mode every later
    # component inherits the earlier roundings, so its budgets flag honest drift too.
    judged = [r for r in reports if r.mode == "isolated"] or reports
    return EXIT_BREACH if any(r.first_divergence for r in judged) else 0


def _repo_root() -> Path:
    here = Path.cwd()
    if (here / "tests").is_dir():
        return here
    return Path(__file__).resolve().parent.parent


def cmd_mutants(args) -> int:
    from rich.table import Table

    from oracles.registry import MUTANT_ENV, mutants

    root = _repo_root()
    jobs = []
    for op in _ops(args.ops):
        test = root / "tests" / f"test_{op}.py"
        if not test.exists():
            raise SystemExit(f"parity: no test file {test} for op {op}")
        for name in mutants(op):
            jobs.append((op, name, test))

    def run(job):
        op, name, test = job
        env = dict(os.environ, **{MUTANT_ENV: f"{op}:{name}"})
        cmd = [sys.executable, "-m", "pytest", str(test), "-x", "-q", "--no-header", "-p", "no:cacheprovider",
               f"--hypothesis-profile={args.profile}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        failed = [ln.removeprefix("FAILED ").split(" - ")[0] for ln in p.stdout.splitlines() if ln.startswith("FAILED")]
        detail = failed[0].split("::", 1)[-1] if failed else (p.stdout + p.stderr)[-300:]
        return op, name, p.returncode, time.perf_counter() - t0, detail

    console = _console()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run, jobs))
    table = Table(title=f"parity mutants ({args.profile} profile)")
    for col in ("op", "mutant", "verdict", "s", "killed by"):
        table.add_column(col, overflow="fold")
    survived = errors = 0
    for op, name, rc, secs, detail in results:
        if rc == 1:
            verdict = "[green]killed[/]"
        elif rc == 0:
            verdict, survived = "[red]SURVIVED[/]", survived + 1
        else:
            verdict, errors = f"[yellow]error (pytest exit {rc})[/]", errors + 1
        table.add_row(op, name, verdict, f"{secs:.0f}", detail if rc == 1 else detail[-200:])
    console.print(table)
    killed = len(results) - survived - errors
    console.print(f"{killed}/{len(results)} killed, {survived} survived, {errors} errors")
    return EXIT_BREACH if (survived or errors) else 0


def cmd_gradients(args) -> int:
    """The worst gradient accuracy ratio of each op in each dtype on this backend (oracles.gradients)."""
    import datetime as _dt

    from ruamel.yaml.comments import CommentedMap

    from oracles import gradients
    from oracles.jaxsetup import configure_jax
    from oracles.registry import OP_NAMES, backend, harness
    from oracles import tighten
    from oracles.budgets import yaml_rt
    from oracles.tighten import versions

    configure_jax()
    tol = _load_tolerances(args.tolerances)
    ops = args.ops or [op for op in OP_NAMES if harness(op).gradient is not None]
    results = {}  # op -> dtype -> result
    for op in ops:
        for dtype in args.dtypes:
            t0 = time.time()
            worst = gradients.sweep(op, examples=args.examples, seed=args.seed, tolerances=tol, dtype=dtype)
            budget = tol.lookup(op, dtype, backend()).properties.get("grad_ratio")
            measured = max((w["ratio"] for w in worst.values()), default=0.0)
            proposed = tighten.propose("accuracy.ratio", measured, args.margin)  # the accuracy ratio's rule
            cases = len({w["case"] for w in worst.values()})
            results.setdefault(op, {})[dtype] = {
                "budget": budget, "measured": measured, "proposed": proposed, "inputs": worst,
                "worst_input": max(worst, key=lambda n: worst[n]["ratio"], default=None),
                "seconds": round(time.time() - t0, 1), "distinct_worst_cases": cases}
            for name, w in worst.items():
                print(f"{op:<11} {dtype:<9} grad({name}): worst ratio {w['ratio']:.4g} [budget {budget}]  "
                      f"case {w['case']}")
            print(f"{op:<11} {dtype:<9} grad_ratio: measured {measured:.4g} -> proposed {proposed:g} (budget {budget})")
    meta = {"backend": backend(), "examples": args.examples, "seed": args.seed, "versions": versions()}
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "ops": results}, indent=1) + "\n")
    if args.write:  # grad_ratio := proposed where there is none, or where it is within the budget
        with tighten.locked(tol.path):
            data = yaml_rt().load(tol.path.read_text())
            for op, by_dtype in results.items():
                for dtype, r in by_dtype.items():
                    entry = data[op][dtype][backend()]
                    if not (r["budget"] is None or r["proposed"] <= r["budget"] or args.allow_loosen):
                        continue
                    entry.setdefault("properties", CommentedMap())["grad_ratio"] = r["proposed"]
                    # Where the number came from, beside the forward sample's provenance (which
                    # `parity tighten` rewrites, keeping this key).
                    entry["provenance"]["gradient"] = CommentedMap(
                        measured=float(f"{r['measured']:.4g}"), input=r["worst_input"], examples=args.examples,
                        seed=args.seed, margin=args.margin, date=_dt.date.today().isoformat(), backend=backend(),
                        command="parity gradients", versions=CommentedMap(meta["versions"]))
            tighten.write_atomic(tol.path, tighten.dump(data))
    over = [f"{op}/{dt}" for op, by_dtype in results.items() for dt, r in by_dtype.items()
            if r["budget"] is not None and not r["measured"] <= r["budget"]]
    return EXIT_BREACH if over else 0


def cmd_repro(args) -> int:
    from oracles.jaxsetup import configure_jax
    from oracles.registry import Case, run_case

    configure_jax()
    try:
        case = Case.from_json(args.case)
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"parity repro: cannot read the case JSON ({e}); pass the text after 'parity repro'") from None
    tol = _load_tolerances(args.tolerances)
    if args.gradient:
        from oracles import gradients
        from oracles.registry import active_kernel, backend, harness

        budget = tol.lookup(case.op, case.dtype, backend(), case.recipe)
        js = gradients.judge(harness(case.op).gradient(case, active_kernel(case.op)), budget)
        print(f"{case.op} gradient [{case.dtype}, {budget.backend}, {case.kwargs}] shapes {case.shapes} "
              f"budget {budget.key_path}.properties.grad_ratio")
    else:
        _, budget, js = run_case(case, tol)
        print(f"{case.op} [{case.dtype}, {budget.backend}, {case.kwargs}] shapes {case.shapes} "
              f"budget {budget.key_path}")
    for j in js:
        print()
        print(j.message(header=" ", reproducer=""))
    return 0 if all(j.ok for j in js) else EXIT_BREACH


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="measure every op x dtype against tolerances.yaml")
    c.add_argument("--ops", nargs="*", help="ops to check (default: all)")
    c.add_argument("--dtypes", nargs="*", help="dtypes (default: float32 bfloat16 float16)")
    c.add_argument("--examples", type=int, default=20, help="cases per op x dtype (default 20)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--tolerances", default=None, help="path of tolerances.yaml")
    c.set_defaults(fn=cmd_check)

    t = sub.add_parser("tighten", help="measure and ratchet the budgets in tolerances.yaml")
    t.add_argument("--ops", nargs="*")
    t.add_argument("--dtypes", nargs="*")
    t.add_argument("--examples", type=int, default=200, help="cases per op x dtype (default 200)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--margin", type=float, default=1.25, help="budget = measured x margin, rounded up (default 1.25)")
    t.add_argument("--allow-loosen", action="store_true", help="let a budget grow when the measurement exceeds it")
    t.add_argument("--dry-run", action="store_true", help="print old -> new, write nothing")
    t.add_argument("--fresh", action="store_true",
                   help="drop the recorded sample instead of folding the new one into it (after a kernel change)")
    t.add_argument("--profile", default="parity tighten", help="recorded in provenance (e.g. thorough)")
    t.add_argument("--implementation", default=None,
                   help="measure this registered implementation of the ops (its own budget, "
                        "e.g. attention's pallas_flash) instead of the op's kernel")
    t.add_argument("--tolerances", default=None)
    t.set_defaults(fn=cmd_tighten)

    rp = sub.add_parser("report", help="markdown + PNG plots of the measured errors against the budgets")
    rp.add_argument("--ops", nargs="*")
    rp.add_argument("--dtypes", nargs="*")
    rp.add_argument("--examples", type=int, default=60)
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--out", default="reports", help="output folder (default ./reports)")
    rp.add_argument("--tolerances", default=None)
    rp.set_defaults(fn=cmd_report)

    dv = sub.add_parser("diverge", help="find the first component where the JAX model departs from transformers")
    dv.add_argument("--config", default="tiny", help="tiny, tiny-tied, qwen2.5-0.5b ... qwen2.5-72b (random weights)")
    dv.add_argument("--checkpoint", default=None, help="a local HF checkpoint directory (safetensors)")
    dv.add_argument("--layers", type=int, default=None, help="keep only the first N layers of a preset")
    dv.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    dv.add_argument("--tokens", type=int, default=64)
    dv.add_argument("--batch", type=int, default=1)
    dv.add_argument("--seed", type=int, default=0)
    dv.add_argument("--mode", default="both", choices=["isolated", "accumulated", "both"])
    dv.add_argument("--inject", action="append", default=[], metavar="'layer=L component=C scale=S'",
                    help="plant a bug in the JAX side (repeatable)")
    dv.add_argument("--out", default="reports/diverge")
    dv.add_argument("--tolerances", default=None)
    dv.set_defaults(fn=cmd_diverge)

    g = sub.add_parser("gradients", help="measure each op's gradient against torch autograd's")
    g.add_argument("--ops", nargs="*")
    g.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"],
                   choices=["float32", "bfloat16", "float16"], help="(default: all three)")
    g.add_argument("--examples", type=int, default=60, help="cases per op (default 60)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="write the results as JSON here")
    g.add_argument("--margin", type=float, default=1.25, help="proposed budget = measured x margin, rounded up")
    g.add_argument("--write", action="store_true",
                   help="write the proposed grad_ratio into tolerances.yaml (never loosening unless told)")
    g.add_argument("--allow-loosen", action="store_true")
    g.add_argument("--tolerances", default=None)
    g.set_defaults(fn=cmd_gradients)

    m = sub.add_parser("mutants", help="prove the tests kill every registered bug class")
    m.add_argument("--ops", nargs="*")
    m.add_argument("--profile", default="ci", help="hypothesis profile for the test runs (default ci)")
    m.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    m.set_defaults(fn=cmd_mutants)

    r = sub.add_parser("repro", help="rerun one case from a failure's reproducer line")
    r.add_argument("case", help="the case JSON printed after 'parity repro'")
    r.add_argument("--gradient", action="store_true", help="rerun the case's gradient check")
    r.add_argument("--tolerances", default=None)
    r.set_defaults(fn=cmd_repro)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
