#!/usr/bin/env bash
# Distributed training with torchrun (python -m torch.distributed.run):
#   tools/dist_train.sh CONFIG GPUS [tools/train.py options]
# GPUS processes on this node; several nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on each.
# Without GPUs it still runs (gloo on CPU, GPUS processes). PYTHON selects the interpreter.
set -euo pipefail
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$TOOLS_DIR/launch_common.sh"
need_args 2 "CONFIG GPUS [train.py options]" $#
# CONFIG=$1, GPUS=$2
run_with_torchrun "$2" "$TOOLS_DIR/train.py" "$1" --launcher pytorch "${@:3}"
