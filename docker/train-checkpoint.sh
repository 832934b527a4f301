#!/bin/sh
# Train a checkpoint onto the checkpoints volume so that /checkpoints/NAME is either complete or
# absent, never half-trained. Used by the compose `checkpoint-init` and `train` services and by
# the Kubernetes Jobs (installed in the images as /usr/local/bin/train-checkpoint).
#
#   train-checkpoint NAME DATA_DIR [cllm4rec train options...]
#   train-checkpoint NAME --demo   (the quickstart's model: generated data, SmolLM2 cut to 4 layers)
#
# - /checkpoints/NAME exists: nothing to do, so an init container or a Job can run on every start.
# - Otherwise it trains into /checkpoints/.NAME.partial, continuing with --resume where an earlier
#   attempt was interrupted (container stopped, pod evicted), and renames that to /checkpoints/NAME
#   once training has finished. The trainer rewrites its best checkpoint during the run, so serving
#   only ever points at NAME, which appears in one rename.
# - TORCHRUN_ARGS set (the multi-node Job, k8s/components/multi-node-training): data-parallel,
#   `torchrun $TORCHRUN_ARGS cllm4rec train ...`; only the pod of JOB_COMPLETION_INDEX 0 (rank 0's)
#   clears an unusable partial directory and renames the finished one.
set -eu

root="${CLLM4REC_CHECKPOINTS_ROOT:-/checkpoints}"

if [ "$#" -lt 2 ]; then
    echo "usage: train-checkpoint NAME DATA_DIR|--demo [cllm4rec train options...]" >&2
    exit 2
fi
name="$1"
data="$2"
shift 2
case "$name" in
    "" | .* | */*) echo "train-checkpoint: NAME must be a plain directory name, not '$name'" >&2; exit 2 ;;
esac

final="$root/$name"
partial="$root/.$name.partial"

if [ -e "$final" ]; then
    echo "train-checkpoint: $final exists; nothing to do"
    exit 0
fi

if [ "$data" = "--demo" ]; then
    if [ "$#" -gt 0 ]; then
        echo "train-checkpoint: --demo takes no train options (it is the quickstart's model)" >&2
        exit 2
    fi
    # The quickstart's model without the serving: its data and training settings live in one place
    # (service/cli.py), and it resumes an interrupted run in $partial by itself.
    cllm4rec quickstart --no-serve --dir "$partial"
    mv "$partial/checkpoint" "$final"
    rm -rf "$partial"
    echo "train-checkpoint: $final is ready"
    exit 0
fi

leader=true
[ "${JOB_COMPLETION_INDEX:-0}" = "0" ] || leader=false

resume=""
if [ -f "$partial/train_state/state.json" ]; then
    echo "train-checkpoint: continuing the interrupted run in $partial"
    resume="--resume"
elif $leader; then
    # Interrupted before its first epoch finished: nothing worth keeping.
    rm -rf "$partial"
fi

# $resume and $TORCHRUN_ARGS are deliberately unquoted: words of options, empty means none.
if [ -n "${TORCHRUN_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    torchrun $TORCHRUN_ARGS "$(command -v cllm4rec)" train --data "$data" --out "$partial" $resume "$@"
else
    # shellcheck disable=SC2086
    cllm4rec train --data "$data" --out "$partial" $resume "$@"
fi
if $leader; then
    mv "$partial" "$final"
    echo "train-checkpoint: $final is ready"
fi
