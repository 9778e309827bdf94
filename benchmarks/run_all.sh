#!/usr/bin/env bash
# Every figure in docs/benchmarks.md, in one sequential run on an otherwise idle machine:
#   bash benchmarks/run_all.sh [PATH_TO_PLANTVILLAGE_SAMPLE]
# Results land in reports/bench/ (git-ignored): logs, JSON reports and markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."
SAMPLE=${1:-../shared/data/plantvillage-mini}
PY=.venv/bin/python
R=reports/bench
mkdir -p "$R"
export METAFLOW_USER=${METAFLOW_USER:-bench}
{ date -u; nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200; uptime; } > "$R/machine.txt"

# 1. The training flow on the real sample (issue 2 bars).
/usr/bin/time -v $PY flows/train_flow.py run --data-dir "$SAMPLE" --run-id-file "$R/real_run_id" \
  > "$R/flow_real.log" 2>&1
$PY benchmarks/flow_report.py "$(cat "$R/real_run_id")" > "$R/flow_real_report.json"
BUNDLE=$($PY -c "import json,sys; print(json.load(open('$R/flow_real_report.json'))['bundle'])")
CHAMP=$($PY -c "import json,sys; print(json.load(open('$R/flow_real_report.json'))['champion'])")
cp artifacts/prepared/manifest.csv "$R/real_manifest.csv"
$PY -c "
import torch; c = torch.load('artifacts/train/$(cat "$R/real_run_id")/$CHAMP/model.pt', weights_only=True)
torch.save(c['state_dict'], '$R/model_state.pt')"

# 1b. The behaviour checks on the real sample with this bundle (issue 7: per-class floor,
#     accuracy of accepted predictions, abstention on generated non-leaf images).
PLANTML_EVAL_BUNDLE="$BUNDLE" $PY -m pytest -q -p no:cacheprovider -m integration tests/test_behaviour.py \
  > "$R/behaviour_real.log" 2>&1

# 2. Edge: binary, then latency/size/accuracy of every runtime and precision (issue 4 bars).
edge/build_binary.sh > "$R/edge_build.log" 2>&1 && ls -l dist/plantml-edge >> "$R/edge_build.log"
$PY benchmarks/edge_bench.py --bundle "$BUNDLE" --data-dir "$SAMPLE" --manifest "$R/real_manifest.csv" \
  --binary dist/plantml-edge --compare-s8s8 --json "$R/edge_bench.json" > "$R/edge_bench.md" 2> "$R/edge_bench.log"

# 3. Serving under load vs a plain Flask + torch server (issue 3 bars).
$PY benchmarks/serve_load.py --bundle "$BUNDLE" --weights "$R/model_state.pt" --images "$SAMPLE" \
  --out "$R/serve_load.json" > "$R/serve_load.md" 2> "$R/serve_load.log"

# 4. The no-argument run on the built-in demo data (issue 2: <= 10 minutes).
/usr/bin/time -v $PY flows/train_flow.py run --run-id-file "$R/demo_run_id" > "$R/flow_demo.log" 2>&1
$PY benchmarks/flow_report.py "$(cat "$R/demo_run_id")" > "$R/flow_demo_report.json"
date -u >> "$R/machine.txt"
