#!/usr/bin/env bash
# All GPU measurements of docs/performance.md in one command, finishing within 10 minutes:
#
#   bash tools/gpu_check.sh [OUT_DIR]        (default: ./gpu_out)
#
# 1. what the machine is (GPU, driver, torch, timm);
# 2. the model step of both base models, bf16 + fused AdamW, eager and compiled (suite set "quick");
# 3. the data path and end to end: loader alone (decode + blur each epoch / decoded cache) and the
#    loader feeding the compiled step (suite set "data"; 4096 grey 512x512 PNGs made first).
# Each suite has its own time budget, so the whole script ends within ~9.5 minutes even when
# compiling is slow; what did not fit is listed as skipped in its results.md. The remaining levers
# (published fp16 configuration, channels_last, max-autotune) are the set "levers": run it
# second on the same machine (the inductor cache then makes its compiled runs faster):
#
#   python3 tools/benchmark_suite.py --set levers --out gpu_out/levers --budget_s 500
#
# Seven files are written: gpu.txt and, per suite, results.md / results.jsonl / runs.log.
set -u
out="${1:-gpu_out}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$python" -c "import torch, timm, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'opencv', cv2.__version__, 'cpus', __import__('os').cpu_count())" 2>&1
} > "$out/gpu.txt"
cat "$out/gpu.txt"

# GPU_CHECK_LIST=1 prints the commands the suites would run instead of running them (a dry run here)
list=${GPU_CHECK_LIST:+--list}
"$python" tools/benchmark_suite.py --set quick --out "$out/model" --budget_s 270 --timeout_s 200 $list
"$python" tools/benchmark_suite.py --set data --out "$out/data" --budget_s 270 --timeout_s 150 $list
