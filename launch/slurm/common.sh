# shellcheck shell=bash
# Shared by the sbatch scripts: starts `accelerate launch -m distsent train` on every node of
# the allocation and requeues the job when distsent reports preemption. Sourced, not run.
#
# Environment knobs:
#   DISTSENT_PYTHON       python that has distsent installed (default: python3 on PATH)
#   DISTSENT_LAUNCH_FILE  accelerate config (default: launch/accelerate/ddp.yaml)
#   DISTSENT_REQUEUE      1 (default) requeues a preempted job; 0 leaves it ended. A segment
#                         that made no progress (no optimizer step, no pending validation
#                         finished) is never requeued: the next would stop at the same point
#   DISTSENT_MAX_RESTARTS requeue at most this many times (default: no cap); Slurm's restart
#                         count includes its own requeues (an administrator's, a node failure)
#   DISTSENT_PROCESSES_PER_NODE   ranks per node (default: the GPUs Slurm gave the node, else
#                         DISTSENT_CPU_PROCESSES_PER_NODE, default 1)
#
# Submit from the repository root: the DeepSpeed launch files name their JSON configs by paths
# relative to the working directory, which is the submission directory.

# This file's repository, wherever the job was submitted from.
DISTSENT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

distsent_run_on_nodes() {
    local nodes="$1"; shift
    # Checked now: a cap that is no number would fail its test after training, and requeue.
    if [ -n "${DISTSENT_MAX_RESTARTS:-}" ] && ! [[ "$DISTSENT_MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
        echo "distsent: error: DISTSENT_MAX_RESTARTS=$DISTSENT_MAX_RESTARTS is not a whole number" >&2
        exit 2
    fi
    local python="${DISTSENT_PYTHON:-python3}"
    local launch_file="${DISTSENT_LAUNCH_FILE:-$DISTSENT_REPO/launch/accelerate/ddp.yaml}"
    # Processes per node: as set, else the GPUs Slurm gave this node, else (CPU node) one.
    # Read on the batch node: every node must have the same count.
    local per_node="${DISTSENT_PROCESSES_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
    if [ -z "$per_node" ] || [ "$per_node" = "0" ]; then
        per_node="${DISTSENT_CPU_PROCESSES_PER_NODE:-1}"
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            echo "distsent: warning: GPUs are visible but Slurm assigned none (no --gpus-per-node?):" \
                "starting $per_node process(es) per node; set DISTSENT_PROCESSES_PER_NODE to use them" >&2
        fi
    fi
    local head_node
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    # A port per job, so jobs sharing a node do not collide.
    # Below Linux's ephemeral range (32768-60999), where outgoing connections take theirs.
    local port=$(( 10000 + SLURM_JOB_ID % 20000 ))
    local marker="$DISTSENT_REPO/.distsent-preempted-$SLURM_JOB_ID"
    rm -f "$marker"
    # Also when the batch shell itself is ended (a time limit's SIGTERM, scancel). Expanded
    # now, on purpose: $marker is local to this function.
    # shellcheck disable=SC2064
    trap "rm -f $(printf '%q' "$marker")" EXIT
    export DISTSENT_PREEMPTED_FILE="$marker"
    # No arguments must stay none: printf would turn them into one empty argument.
    local arguments=""
    if [ $# -gt 0 ]; then
        arguments="$(printf '%q ' "$@")"
    fi

    echo "distsent: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $per_node process(es), head $head_node:$port"
    set +e
    # SLURM_NODEID is expanded by the shell srun starts on each node, not here.
    # Slurm's --signal=USR1 reaches every process of the step. The launcher must survive it
    # (USR1 would kill it by default): it ignores USR1, and each distsent rank installs its
    # own handler, which replaces the inherited "ignore".
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        trap '' USR1
        exec \"$python\" -m accelerate.commands.launch \
            --config_file \"$launch_file\" \
            --num_machines $nodes --num_processes $(( nodes * per_node )) \
            --machine_rank \$SLURM_NODEID \
            --main_process_ip $head_node --main_process_port $port \
            -m distsent train $arguments"
    local status=$?
    set -e
    if [ -f "$marker" ]; then
        # A segment that ended where it began (distsent logged why) would do so again.
        local progressed=1
        if grep -q '"made_progress": false' "$marker"; then progressed=0; fi
        rm -f "$marker"
        local restarts="${SLURM_RESTART_COUNT:-0}"
        if [ "${DISTSENT_REQUEUE:-1}" != "1" ]; then
            echo "distsent: preempted (exit 75); not requeueing (DISTSENT_REQUEUE=${DISTSENT_REQUEUE})"
        elif [ "$progressed" = 0 ]; then
            echo "distsent: error: preempted (exit 75) with no progress since the checkpoint this segment resumed from; not requeueing job $SLURM_JOB_ID" >&2
        elif [ -n "${DISTSENT_MAX_RESTARTS:-}" ] && [ "$restarts" -ge "$DISTSENT_MAX_RESTARTS" ]; then
            echo "distsent: error: preempted (exit 75) after $restarts restart(s), the cap DISTSENT_MAX_RESTARTS=$DISTSENT_MAX_RESTARTS; not requeueing job $SLURM_JOB_ID" >&2
        else
            echo "distsent: preempted (exit 75); requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
        fi
        exit 75
    fi
    exit "$status"
}
