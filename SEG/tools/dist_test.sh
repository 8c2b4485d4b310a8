#!/usr/bin/env bash
# Distributed evaluation with torchrun (python -m torch.distributed.run):
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options, e.g. --eval mIoU]
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT). Without GPUs it runs on CPU (gloo).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$TOOLS_DIR/launch_common.sh"
run_with_torchrun "$GPUS" "$TOOLS_DIR/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
