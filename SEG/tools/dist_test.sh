#!/usr/bin/env bash
# Distributed evaluation with torchrun (python -m torch.distributed.run):
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py options, e.g. --eval mIoU]
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT). Without GPUs it runs on CPU (gloo).
set -euo pipefail
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$TOOLS_DIR/launch_common.sh"
need_args 3 "CONFIG CHECKPOINT GPUS [test.py options]" $#
# CONFIG=$1, CHECKPOINT=$2, GPUS=$3
run_with_torchrun "$3" "$TOOLS_DIR/test.py" "$1" "$2" --launcher pytorch "${@:4}"
