#!/bin/bash
# The device check on a CUDA machine (DEVELOPERS.md, "On a GPU"): prebuild every kernel in
# parallel, gpu_check.py once per spec (own process: a sticky CUDA error stays in its
# row), where a step's time goes, then the gpu tests. Usage: benchmarks/gpu_run.sh OUT_DIR
set -u
OUT=${1:?usage: benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
T0=$(date +%s)
since() { echo "$1 at $(( $(date +%s) - T0 )) s"; }
SPECS="small_fc_lopt velo adam mulo elo celo2 elo_celo2"
timeout 200 python3 benchmarks/gpu_check.py --prebuild-only --specs "${SPECS// /,}" > "$OUT/prebuild.log" 2>&1
since "prebuild rc=$?"
for s in $SPECS; do
  timeout 60 python3 benchmarks/gpu_check.py --specs "$s" --bandwidth '' > "$OUT/check.tmp" 2>&1
  since "$s rc=$?"
  cat "$OUT/check.tmp" >> "$OUT/checks.log"
  sed -n '/^## gpu_check/,$p' "$OUT/check.tmp" >> "$OUT/table.md"
done
rm -f "$OUT/check.tmp"
timeout 120 python3 benchmarks/gpu_check.py --specs adam --backends cuda --sizes 100M \
  --bandwidth velo,small_fc_lopt,adam --profile velo,small_fc_lopt,adam > "$OUT/passes.log" 2>&1
since "passes rc=$?"
sed -n '/^## gpu_check/,$p' "$OUT/passes.log" >> "$OUT/table.md"
pytest_args=(-q -p no:cacheprovider -m gpu tests/test_gpu_backends.py tests/test_gpu_reference.py)
python3 -c "import xdist" 2>/dev/null && pytest_args+=(-n 8)
timeout 200 python3 -m pytest "${pytest_args[@]}" > "$OUT/pytest.log" 2>&1
since "pytest rc=$?"
tail -3 "$OUT/pytest.log"
cat "$OUT/table.md"
