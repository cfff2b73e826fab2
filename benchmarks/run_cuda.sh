#!/usr/bin/env bash
# Reduced CUDA benchmark run (about 5-8 minutes on one GPU).
#
# Writes under $OUT (default ./bench-out):
#   benchmarks.json  pytest-benchmark results (or the suite's fallback JSON)
#   benchmarks.md    the Markdown table (ratios to reference and to fwd+bwd)
#   benchmarks.png   time / memory vs parameters (if matplotlib is available)
#   run.log          the pytest output
#
# Missing pytest-benchmark, curvlinops, BackPACK or matplotlib are installed from
# wheels in .whl/ if that folder exists (no index, torch pinned to the installed
# version so it is never changed); otherwise those parts are skipped: the suite has
# a built-in fallback for pytest-benchmark, skips curvlinops/BackPACK benchmarks,
# and writes no plot.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
echo "torch ${TORCH_VERSION}; CUDA: $("$PY" -c 'import torch; print(torch.version.cuda, torch.cuda.is_available())')"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"' || {
  echo "no CUDA device: nothing to benchmark" | tee "$OUT/run.log"; exit 0; }

for pair in pytest_benchmark:pytest-benchmark curvlinops:curvlinops-for-pytorch \
            backpack:backpack-for-pytorch matplotlib:matplotlib; do
  mod="${pair%%:*}"; dist="${pair##*:}"
  if ! has "$mod"; then
    if [ -d .whl ]; then
      echo "installing ${dist} from .whl/"
      "$PY" -m pip install -q --no-index --find-links .whl "$dist" \
        "torch==${TORCH_VERSION}" || echo "could not install ${dist}: skipped"
    else
      echo "${dist} missing and no .whl/ folder: its benchmarks are skipped"
    fi
  fi
done

JSON="$OUT/benchmarks.json"
if has pytest_benchmark; then
  JSON_ARGS=(--benchmark-json="$JSON" --benchmark-columns=median,rounds)
else
  JSON_ARGS=(--kfac-bench-json="$JSON")
fi

# Reduced CUDA subset: the MLPs (incl. the goal problem mlp512), the CNN and the
# sequence model with weight sharing, the dense GGN problems; CUDA only.
export KFAC_BENCH_BUDGET="${KFAC_BENCH_BUDGET:-0.5}"
timeout 420 "$PY" -m pytest benchmarks/ -q -p no:cacheprovider -rs \
  --kfac-bench-devices=cuda \
  --kfac-bench-problems=mlp64,mlp512,cnn,seqmean,ggn7k,ggnsmall \
  -k "not naive" \
  "${JSON_ARGS[@]}" 2>&1 | tail -n 200 > "$OUT/run.log"
STATUS=${PIPESTATUS[0]}
echo "pytest exit status: ${STATUS}" | tee -a "$OUT/run.log"

if [ -f "$JSON" ]; then
  "$PY" -m benchmarks.bench --report-only "$JSON" --out "$OUT" || true
  cat "$OUT/benchmarks.md" 2>/dev/null | head -n 40
fi
exit "$STATUS"
