# Sourced by dist_train.sh and dist_test.sh: their argument check and one torchrun launch for both.

# need_args COUNT USAGE NUMBER_GIVEN: stop with the usage line unless COUNT arguments were given.
need_args() {
    if [ "$3" -lt "$1" ]; then
        echo "usage: $0 $2" >&2
        exit 2
    fi
}

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
