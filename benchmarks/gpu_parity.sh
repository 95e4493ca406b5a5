#!/usr/bin/env bash
# One device call (see the `device` tool): GPU budgets measured on the gpu backend, then the
# property suite on the GPU against them. Run from the repository root, with $OUT set and the
# ruamel.yaml wheel carried in .whl/ (the device image has no ruamel.yaml and no network).
#   EXAMPLES=20 bash benchmarks/gpu_parity.sh
# Knobs: SKIP_TIGHTEN, TIGHTEN_S, TIGHTEN_ARGS, SKIP_CHECK, CHECK_S, WORKERS, PYTEST_S, BENCH, BENCH_S.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# Several pytest workers share one GPU: no process may grab 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PARITY_JAX_CACHE=/tmp/jaxcache
nvidia-smi -L
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
cp tolerances.yaml "$OUT/tolerances.yaml"
export PARITY_TOLERANCES="$OUT/tolerances.yaml"
if [ -n "${SKIP_TIGHTEN:-}" ]; then echo "skipping tighten"; else
echo "== parity tighten on the gpu backend (new gpu entries; cpu entries untouched)"
timeout "${TIGHTEN_S:-300}" python3 -m oracles.cli tighten --examples "${EXAMPLES:-20}" --profile "parity tighten (gpu)" ${TIGHTEN_ARGS:-} \
  > "$OUT/tighten.log" 2>&1
echo "tighten exit $?"; grep -E "tightened|refused|Error|error" "$OUT/tighten.log" | tail -5; fi
if [ -n "${SKIP_CHECK:-}" ]; then echo "skipping check"; else
echo "== parity check on the gpu backend"
timeout "${CHECK_S:-300}" python3 -m oracles.cli check --examples 10 > "$OUT/check.log" 2>&1; echo "check exit $?"
tail -5 "$OUT/check.log"; fi
echo "== the property suite on the GPU (ci profile)"
timeout "${PYTEST_S:-240}" python3 -m pytest -v -n "${WORKERS:-8}" -p no:cacheprovider -p no:benchmark \
  > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | grep -v "^tests/.*PASSED" | tail -40
if [ -n "${BENCH:-}" ]; then
  echo "== benchmark"
  timeout "${BENCH_S:-300}" python3 benchmarks/gpu.py --out "$OUT/h100.json" > "$OUT/gpu_bench.log" 2>&1
  echo "bench exit $?"; tail -60 "$OUT/gpu_bench.log"
fi
