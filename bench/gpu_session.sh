#!/usr/bin/env bash
# The one prepared GPU run for a session that gets a device (15 minutes in all, one command of at most 10):
# the most important rows first, each part under its own time limit so that one slow part cannot take the
# rest of the lease. Results go to $OUT (the device tool's folder) or bench/results/.
#   run: bash bench/gpu_session.sh        (smoke test on any machine: bash bench/gpu_session.sh --smoke)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
smoke=${1:-}
part() {
    local limit=$1
    shift
    echo "== $* (at most ${limit}s)"
    timeout "$limit" "$@" $smoke 2>&1 | tail -40
}
# The limits add up to 580 s, under the device's 600 s per command. Most important first.
# issue 25: memory per service on the GPU (torch and the driver's view), returned by an idle unload, reloaded from the
# int8 weight cache; 4 of the 8B shape's 36 layers, int8 and bf16
part 90 python bench/memory.py --shapes qwen3_8b_embed --layers 4 --modes int8 none --out "$out/gpu_memory.json"
part 170 python bench/gpu_quantization.py --out "$out/gpu_quantization.json"          # issue 17: int8 vs bf16
part 100 python bench/gpu_siglip.py --images 1024 --out "$out/gpu_siglip.json"           # issue 13: vision tower
part 100 python bench/gpu_throughput.py --final --only bert-large --out "$out/gpu_bert.json"  # issue 13: PackedBert
if [ -z "$smoke" ]; then  # a real CUDA OOM needs a GPU (no smoke mode)
    timeout 50 python bench/gpu_faults.py --out "$out/gpu_faults.json" 2>&1 | tail -40  # issue 15
fi
# torchvision's own decode_jpeg behind runners/gpu_decode.py (the README's tests have no torchvision to run it), and
# the GPU memory budget between two real service processes (issue 25)
timeout 70 python -m pytest -q -o addopts= -p no:cacheprovider bench/device_checks 2>&1 | tail -20
