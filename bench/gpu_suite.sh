#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one bounded run, on a machine with a CUDA device, the
# project importable, redis-server on the PATH and the shared datasets in DATA_DIR:
#
#   bench/gpu_suite.sh DATA_DIR LOG_DIR [TRAIN_SECONDS]
#
# Each step has a time limit and its own log in LOG_DIR; a failed step does not stop the others.
# The training run is the paper recipe at full depth, its pretraining cut to 1 + 2 epochs so that
# finetuning starts within a lent device's minutes (batch 128: GPU steps are launch-bound), with
# --time-budget TRAIN_SECONDS/60: it stops cleanly and keeps the best checkpoint so far, which the
# later steps evaluate and serve (a SIGINT at the step's limit is the fallback). The checkpoint goes to a
# temporary directory; its per-epoch metrics are copied to LOG_DIR/train_metrics.jsonl.
set -u
data=$1
logs=$2
train_seconds=${3:-240}
checkpoint=$(mktemp -d)/checkpoint-beauty
mkdir -p "$logs"
export PYTHONUNBUFFERED=1

step() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit} s): $*"
  timeout -s INT -k 20 "$limit" "$@" >"$logs/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started)) s"
  grep -v -e '^\s*$' "$logs/$name.log" | tail -n 20
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
# The default backbone's one-time GGUF -> safetensors conversion, timed on its own.
step convert 180 python3 -c 'from model.backbone import DEFAULT_BACKBONE, load_backbone; load_backbone(DEFAULT_BACKBONE)'
step cuda_tests 180 python3 -m pytest -q -p no:cacheprovider tests/model/test_train_cuda.py tests/service/test_serve_cuda.py
step throughput 150 python3 bench/train_throughput.py --data "$data/amazon-beauty" --layers 30 --batches 12 \
  --batch-size 32 128 512
step train $((train_seconds + 120)) python3 -m service.cli train --data "$data/amazon-beauty" --out "$checkpoint" \
  --recipe paper --content-epochs 1 --pretrain-epochs 2 --batch-size 128 --time-budget "$(python3 -c "print($train_seconds / 60)")"
cp "$checkpoint/metrics.jsonl" "$logs/train_metrics.jsonl"
step evaluate 240 python3 -m service.cli evaluate --checkpoint "$checkpoint" --data "$data/amazon-beauty"
step precision 120 python3 bench/serving_precision.py --checkpoint "$checkpoint"
step serve_latency 240 python3 bench/serve_latency.py --checkpoint "$checkpoint"
