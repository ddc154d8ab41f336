#!/usr/bin/env bash
# Re-make the committed tuning records (schedules/<preset>/) for the bundled example and the reference
# networks. Offline work: CI never tunes, it compiles from what this wrote (tests/test_committed_records.py).
#   bash scripts/tune_records.sh host [TRIALS]        measure on this machine (records for its CPU model)
#   bash scripts/tune_records.sh arm-a72 [TRIALS]     the example measured on an emulated device through a local
#                                                     tracker (plumbing only, the timings mean nothing), the
#                                                     reference networks builder-only (a real board: register
#                                                     its rpc_server at a tracker and use tune directly)
#   bash scripts/tune_records.sh cuda                 builder-only where no GPU is here; measured where one is
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:?usage: tune_records.sh PRESET [TRIALS]}
trials=${2:-8}
python=.venv/bin/python
models=(
    tvm_effconv.models.examples:small_cnn
    tvm_effconv.models.resnet:resnet18_dsconv_small
    tvm_effconv.models.resnet:resnet18_dsq_small_2bit
    tvm_effconv.models.lccl_resnet:lccl_resnet18_small
    tvm_effconv.models.vargnet:vargnet_small
)
case "$preset" in
    arm*)
        port=${TRACKER_PORT:-9590}
        $python -m tvm.exec.rpc_tracker --host 127.0.0.1 --port "$port" --port-end $((port + 1)) >/dev/null 2>&1 &
        tracker=$!
        trap 'kill $tracker 2>/dev/null; $python -m tvm_effconv.device stop --port $((port + 100)) >/dev/null 2>&1 || true' EXIT
        until $python -c "from tvm_effconv.device import rpc; rpc.tracker_summary('127.0.0.1:$port')" 2>/dev/null; do sleep 1; done
        $python -m tvm_effconv.device emulate --preset "$preset" --tracker "127.0.0.1:$port" --key "tune-$preset" \
            --port $((port + 100))
        $python -m tvm_effconv.tune "${models[0]}" --target "$preset" --trials "$trials" \
            --rpc-tracker "127.0.0.1:$port" --rpc-key "tune-$preset"
        for model in "${models[@]:1}"; do $python -m tvm_effconv.tune "$model" --target "$preset" --builder-only; done ;;
    cuda*)
        if $python -c "import tvm, sys; sys.exit(0 if tvm.cuda(0).exist else 1)"; then flag=(--trials "$trials"); else flag=(--builder-only); fi
        for model in "${models[@]}"; do $python -m tvm_effconv.tune "$model" --target "$preset" "${flag[@]}"; done ;;
    *)
        for model in "${models[@]}"; do $python -m tvm_effconv.tune "$model" --target "$preset" --trials "$trials"; done ;;
esac
