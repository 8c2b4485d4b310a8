#!/usr/bin/env bash
# Distributed training with torchrun (python -m torch.distributed.run):
#   tools/dist_train.sh CONFIG GPUS [tools/train.py options]
# GPUS processes on this node; several nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on each.
# Without GPUs it still runs (gloo on CPU, GPUS processes). PYTHON selects the interpreter.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [train.py options]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$TOOLS_DIR/launch_common.sh"
run_with_torchrun "$GPUS" "$TOOLS_DIR/train.py" "$CONFIG" --launcher pytorch "$@"
