# Sourced by dist_train.sh and dist_test.sh: one torchrun launch for both.
# run_with_torchrun NPROC SCRIPT [ARGS ...] starts NPROC processes of SCRIPT on this node; several
# nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on each. PYTHON selects the interpreter.
run_with_torchrun() {
    local nproc=$1 script=$2
    shift 2
    exec "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --master_port="${PORT:-29500}" \
        --nproc_per_node="$nproc" \
        "$script" "$@"
}
