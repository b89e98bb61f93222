#!/usr/bin/env bash
# Starts one torchrun agent on this node; torchrun starts NPROC_PER_NODE training processes.
#
# One node:       launch/torchrun.sh
# Several nodes:  on every node, the same command with the same RDZV_ENDPOINT and RDZV_ID:
#                 NNODES=4 RDZV_ENDPOINT=head-node:29400 RDZV_ID=job42 launch/torchrun.sh
#
# Knobs (environment):
#   RECIPE          recipe name or TOML path (default cpu_demo)
#   NNODES          node count, or MIN:MAX for an elastic range (default 1)
#   NPROC_PER_NODE  processes per node: a number, "gpu" or "auto" (default 1)
#   NODE_RANK       this node's rank; only a hint with the c10d rendezvous (default: assigned)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (default 127.0.0.1:29400 for one node;
#                   required for several nodes)
#   RDZV_ID         rendezvous id, the same on every node of one job (default pfc-$USER)
#   RDZV_BACKEND    default c10d
#   MAX_RESTARTS    restarts of the whole group after a worker fails (default 0); training
#                   resumes from the latest checkpoint (checkpoint.resume="auto")
#   SIGNALS_TO_HANDLE  signals torchrun forwards to its workers (torchrun's default is
#                   SIGTERM,SIGINT,SIGHUP,SIGQUIT; the Slurm scripts add SIGUSR1)
#   SHUTDOWN_TIMEOUT   seconds torchrun waits for workers to exit after forwarding a signal
#                   before it kills them (torchrun's default 30; a checkpoint must fit in it)
#   PYTHON          interpreter (default python3)
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  default 1 here: the workers of each restart get a fresh
#                   store. With torchrun's shared store (0) a restarted group can read the
#                   previous round's addresses and fail to connect (pytorch/pytorch#135712).
#   DRY_RUN=1       print the command and exit without running it
#   PFC_EXIT_STATUS_DIR  where the workers record their exit codes (default: a fresh temporary
#                   directory, removed at the end)
# Exit status: the workers' own code (0 done, 2 bad input, 3 diverged, 75 checkpointed on a
# signal and resumable), not torchrun's 1; see docs/launch.md.
# Extra arguments: KEY=VALUE become `--set KEY=VALUE`; options (`--set k=v`, `--no-export`) pass
# through to `pfc train`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RECIPE=${RECIPE:-cpu_demo}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-pfc-${USER:-user}}
MAX_RESTARTS=${MAX_RESTARTS:-0}

case "$NNODES" in
    *:*) pfc_require_uint "NNODES (min)" "${NNODES%%:*}"; pfc_require_uint "NNODES (max)" "${NNODES##*:}"
         max_nodes=${NNODES##*:} ;;
    *) pfc_require_uint NNODES "$NNODES"; max_nodes=$NNODES ;;
esac
case "$NPROC_PER_NODE" in
    gpu|auto) ;;
    *) pfc_require_uint NPROC_PER_NODE "$NPROC_PER_NODE" ;;
esac
pfc_require_uint MAX_RESTARTS "$MAX_RESTARTS"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ -z "${RDZV_ENDPOINT:-}" ]; then
    # Several nodes must agree on one endpoint; guessing one would hang every node but the head.
    [ "$max_nodes" -le 1 ] || pfc_die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)"
    RDZV_ENDPOINT=127.0.0.1:29400
fi
case "$RDZV_ENDPOINT" in
    *:*) ;;
    *) pfc_die "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'" ;;
esac

cmd=("$(pfc_python)" -m torch.distributed.run
     --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
     --rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID"
     --max-restarts="$MAX_RESTARTS")
# Only passed when set: older torchrun versions do not have these options.
[ -z "${SIGNALS_TO_HANDLE:-}" ] || cmd+=(--signals-to-handle="$SIGNALS_TO_HANDLE")
if [ -n "${SHUTDOWN_TIMEOUT:-}" ]; then
    pfc_require_uint SHUTDOWN_TIMEOUT "$SHUTDOWN_TIMEOUT"
    cmd+=(--shutdown-timeout="$SHUTDOWN_TIMEOUT")
fi
if [ -n "${NODE_RANK:-}" ]; then
    pfc_require_uint NODE_RANK "$NODE_RANK"
    cmd+=(--node-rank="$NODE_RANK")
fi
cmd+=(-m train train --config "$RECIPE")
PFC_ARGS=()
pfc_set_args "$@"
cmd+=("${PFC_ARGS[@]}")

pfc_print_cmd "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" "${cmd[@]}"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
# Not exec: torchrun's agent exits 1 for any worker failure (and with its own error when it is
# signalled), so this shell forwards the signals and then exits with the workers' own code:
# 75 when they checkpointed on a signal, 2/3 for bad input/divergence (docs/launch.md).
rc=0
pfc_run_workers "${cmd[@]}" || rc=$?
exit "$rc"
