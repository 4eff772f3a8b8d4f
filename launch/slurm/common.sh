# Shared by the sbatch scripts: starts `accelerate launch -m distsent train` on every node of
# the allocation and requeues the job when distsent reports preemption. Sourced, not run.
#
# Environment knobs:
#   DISTSENT_PYTHON       python that has distsent installed (default: python3 on PATH)
#   DISTSENT_LAUNCH_FILE  accelerate config (default: launch/accelerate/ddp.yaml)
#   DISTSENT_REQUEUE      1 (default) requeues a preempted job; 0 leaves it ended

distsent_run_on_nodes() {
    local nodes="$1"; shift
    local repo="${SLURM_SUBMIT_DIR:-$PWD}"
    local python="${DISTSENT_PYTHON:-python3}"
    local launch_file="${DISTSENT_LAUNCH_FILE:-$repo/launch/accelerate/ddp.yaml}"
    # Processes per node: the GPUs Slurm gave us, else (CPU node) the tasks' CPU count.
    local per_node="${SLURM_GPUS_ON_NODE:-}"
    if [ -z "$per_node" ] || [ "$per_node" = "0" ]; then
        per_node="${DISTSENT_CPU_PROCESSES_PER_NODE:-1}"
    fi
    local head_node
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    # A port per job, so jobs sharing a node do not collide.
    # Below Linux's ephemeral range (32768-60999), where outgoing connections take theirs.
    local port=$(( 10000 + SLURM_JOB_ID % 20000 ))
    local marker="$repo/.distsent-preempted-$SLURM_JOB_ID"
    rm -f "$marker"
    export DISTSENT_PREEMPTED_FILE="$marker"

    echo "distsent: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $per_node process(es), head $head_node:$port"
    set +e
    # SLURM_NODEID is expanded by the shell srun starts on each node, not here.
    # Slurm's --signal=USR1 reaches every process of the step. The launcher must survive it
    # (USR1 would kill it by default): it ignores USR1, and each distsent rank installs its
    # own handler, which replaces the inherited "ignore".
    srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        trap '' USR1
        exec \"$python\" -m accelerate.commands.launch \
            --config_file \"$launch_file\" \
            --num_machines $nodes --num_processes $(( nodes * per_node )) \
            --machine_rank \$SLURM_NODEID \
            --main_process_ip $head_node --main_process_port $port \
            -m distsent train $(printf '%q ' "$@")"
    local status=$?
    set -e
    if [ -f "$marker" ]; then
        rm -f "$marker"
        if [ "${DISTSENT_REQUEUE:-1}" = "1" ]; then
            echo "distsent: preempted (exit 75); requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
        fi
        exit 75
    fi
    exit "$status"
}
