#!/usr/bin/env bash
# The GPU figures in bench/RESULTS.md on a lent H100/H200. All of them take over 10 minutes
# (at 120 steps, the first H100 run finished 6 of the 8 it had in 9 minutes); name configurations to
# split them across shorter calls:
#
#     bash bench/gpu_suite.sh OUT_DIR [SUITE...] [-- extra gpu_throughput.py arguments]
#
# SUITE names configurations below (default: all, in order). Every configuration's JSON
# records go to OUT_DIR/results.jsonl, tagged with its name, and its log to OUT_DIR/suite.log.
# A failing configuration is reported there and the next one still runs: a device lease is
# short, and one broken configuration should not cost the others' numbers. The exit status
# is 1 if any configuration failed, 2 for an unknown configuration name.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash bench/gpu_suite.sh OUT_DIR [SUITE...] [-- extra gpu_throughput.py arguments]" >&2
    exit 2
fi
out=$1
shift
selected=()
while [[ $# -gt 0 && $1 != "--" ]]; do
    selected+=("$1")
    shift
done
[[ ${1:-} == "--" ]] && shift
extra=("$@")
python=${PYTHON:-python3}
mkdir -p "$out"
failed=0

declare -A configs=(
    # The issue's workload: micro-batch 32, eager.
    [eager_b32]="--seq-lengths 128,512 --batch-size 32"
    # Larger micro-batches: fewer kernel launches per token.
    [eager_b256_s128]="--seq-lengths 128 --batch-size 256"
    [eager_b64_s512]="--seq-lengths 512 --batch-size 64"
    [compile_b32_s128]="--seq-lengths 128 --batch-size 32 --set train.compile=true"
    [compile_b256_s128]="--seq-lengths 128 --batch-size 256 --set train.compile=true"
    [compile_b64_s512]="--seq-lengths 512 --batch-size 64 --set train.compile=true"
    # Memory per ZeRO stage on one GPU (one process: the figures are per-GPU upper bounds).
    [zero2_b32_s128]="--seq-lengths 128 --batch-size 32 --launch-file launch/accelerate/zero2.yaml"
    [zero3_b32_s128]="--seq-lengths 128 --batch-size 32 --launch-file launch/accelerate/zero3.yaml"
    [zero3_offload_b32_s128]="--seq-lengths 128 --batch-size 32 --launch-file launch/accelerate/zero3_offload.yaml"
)
order=(eager_b32 eager_b256_s128 eager_b64_s512 compile_b32_s128 compile_b256_s128 compile_b64_s512 zero2_b32_s128
    zero3_b32_s128 zero3_offload_b32_s128)
[[ ${#selected[@]} -gt 0 ]] && order=("${selected[@]}")

for name in "${order[@]}"; do
    if [[ -z ${configs[$name]:-} ]]; then
        echo "unknown configuration: $name (known: ${!configs[*]})" >&2
        exit 2
    fi
done

for name in "${order[@]}"; do
    records=$(mktemp)
    echo "== $name: $python bench/gpu_throughput.py ${configs[$name]} ${extra[*]}" | tee -a "$out/suite.log"
    # shellcheck disable=SC2086  # the configuration strings are word lists on purpose
    if $python bench/gpu_throughput.py ${configs[$name]} "${extra[@]}" --output "$records" >>"$out/suite.log" 2>&1; then
        $python -c 'import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({"suite": sys.argv[2], **json.loads(line)}))' "$records" "$name" | tee -a "$out/results.jsonl"
    else
        echo "!! $name failed (exit $?): see $out/suite.log" | tee -a "$out/suite.log"
        failed=1
    fi
    rm -f "$records"
done
exit $failed
