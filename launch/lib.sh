# Shared helpers of the launch scripts. Sourced, never executed; defines functions only.

# pfc_die MESSAGE...: prints "launch: MESSAGE" on stderr and exits 2 (a usage/config error).
pfc_die() {
    echo "launch: $*" >&2
    exit 2
}

# pfc_require_uint NAME VALUE: fails unless VALUE is a non-negative integer.
pfc_require_uint() {
    case "$2" in
        ''|*[!0-9]*) pfc_die "$1 must be a non-negative integer, got '$2'" ;;
    esac
}

# pfc_python: the interpreter to run (PYTHON knob; default python3).
pfc_python() {
    echo "${PYTHON:-python3}"
}

# pfc_set_args ARG...: appends the arguments to the array PFC_ARGS, turning each KEY=VALUE into
# `--set KEY=VALUE`; options (`--set k=v`, `--no-export`) and the value after `--set`/`-c`/`--config`
# pass through untouched. Runs in the caller's shell so that a bad argument ends the script.
pfc_set_args() {
    local a takes_value=0
    for a in "$@"; do
        if [ "$takes_value" = 1 ]; then
            PFC_ARGS+=("$a"); takes_value=0; continue
        fi
        case "$a" in
            --set|-c|--config|--recipe) PFC_ARGS+=("$a"); takes_value=1 ;;
            -*) PFC_ARGS+=("$a") ;;
            *=*) PFC_ARGS+=(--set "$a") ;;
            *) pfc_die "extra argument '$a' is neither KEY=VALUE (a config override) nor an option" ;;
        esac
    done
    [ "$takes_value" = 0 ] || pfc_die "'${PFC_ARGS[-1]}' needs a value"
}

# pfc_print_cmd ARG...: prints the command, shell-quoted, on stderr with a "+ " prefix.
pfc_print_cmd() {
    local out="+" a
    for a in "$@"; do
        out+=" $(printf '%q' "$a")"
    done
    echo "$out" >&2
}

# pfc_first_host NODELIST: first host of a Slurm node list (scontrol when available, else the
# project's own parser, which handles the same compressed forms).
pfc_first_host() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1" | head -n 1
    else
        "$(pfc_python)" -c 'import sys; from train.dist_env import first_slurm_host; print(first_slurm_host(sys.argv[1]))' "$1"
    fi
}

# pfc_run_requeueable CMD...: runs CMD (an srun) in the background of a Slurm batch shell and
# waits for it. SIGUSR1 (sbatch --signal=B:USR1@SECONDS) and SIGTERM received by the batch shell
# are forwarded to CMD; srun passes them to its tasks, and the trainer saves a checkpoint at the
# next step boundary and exits 75 (EXIT_PREEMPTED). The job is then requeued (`scontrol requeue`;
# the job needs --requeue) and its next start resumes from the latest checkpoint.
# PFC_MAX_REQUEUES (default 20) bounds the chain. Returns CMD's exit status.
pfc_run_requeueable() {
    local rc preempted=0 pid
    "$@" &
    pid=$!
    # `wait` returns early when a trapped signal arrives, so wait again until CMD has exited.
    trap 'preempted=1; echo "launch: $(date -u +%FT%TZ) got SIGUSR1, forwarding to srun" >&2; kill -USR1 "$pid" 2>/dev/null || true' USR1
    trap 'preempted=1; echo "launch: $(date -u +%FT%TZ) got SIGTERM, forwarding to srun" >&2; kill -TERM "$pid" 2>/dev/null || true' TERM
    while :; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ -n "${PFC_EXIT_STATUS_DIR:-}" ]; then  # one srun task per rank: their own codes decide
        rc=$(pfc_worker_exit "$rc" "$PFC_EXIT_STATUS_DIR")
    fi
    echo "launch: training step exited with status $rc (preempted=$preempted)" >&2
    if [ "$rc" = 75 ] || { [ "$preempted" = 1 ] && [ "$rc" != 0 ]; }; then
        local restarts=${SLURM_RESTART_COUNT:-0} limit=${PFC_MAX_REQUEUES:-20}
        if [ "$restarts" -ge "$limit" ]; then
            echo "launch: not requeueing: already restarted $restarts times (PFC_MAX_REQUEUES=$limit)" >&2
        else
            # Said before the request: Slurm may end this batch shell as soon as it requeues the job.
            echo "launch: requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the latest checkpoint" >&2
        fi
        if [ "$restarts" -lt "$limit" ] && ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "launch: scontrol requeue $SLURM_JOB_ID failed; resubmit the job to resume" >&2
        fi
    fi
    return "$rc"
}

# pfc_worker_exit RC DIR: prints the exit code to report for a launcher that returned RC, from
# the codes the training processes recorded in DIR (PFC_EXIT_STATUS_DIR: one file
# round<restart>.rank<rank> each, written by `pfc train`; only the latest round counts).
# torchrun's agent reports every worker failure as 1, and exits with its own error when it is
# signalled, so the workers' codes are the truth: some 75 and otherwise 0 -> 75 (a checkpoint was
# committed: a rank returns 75 only after the collective save); all 2 or all 3 -> that code;
# anything else (or nothing recorded) -> RC.
pfc_worker_exit() {
    local rc=$1 dir=$2 f name round best=-1 codes="" c
    if [ "$rc" = 0 ] || [ ! -d "$dir" ]; then
        echo "$rc"; return 0
    fi
    for f in "$dir"/round*.rank*; do
        [ -f "$f" ] || continue
        name=${f##*/round}; round=${name%%.*}
        case "$round" in ''|*[!0-9]*) continue ;; esac
        [ "$round" -gt "$best" ] && best=$round
    done
    [ "$best" -ge 0 ] || { echo "$rc"; return 0; }
    for f in "$dir"/round"$best".rank*; do
        c=$(tr -dc '0-9' < "$f" 2>/dev/null || true)
        [ -n "$c" ] && codes="$codes $c"
    done
    local all75=1 seen75=0 first="" same=1
    for c in $codes; do
        case "$c" in 75) seen75=1 ;; 0) ;; *) all75=0 ;; esac
        if [ -z "$first" ]; then first=$c; elif [ "$c" != "$first" ]; then same=0; fi
    done
    if [ "$seen75" = 1 ] && [ "$all75" = 1 ]; then
        echo 75
    elif [ -n "$first" ] && [ "$same" = 1 ] && { [ "$first" = 2 ] || [ "$first" = 3 ]; }; then
        echo "$first"
    else
        echo "$rc"
    fi
}

# pfc_run_workers CMD...: runs CMD (torchrun) in the background with PFC_EXIT_STATUS_DIR set
# (a fresh directory unless given), forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1 to it, waits,
# and returns the code pfc_worker_exit derives from the workers' recorded codes.
pfc_run_workers() {
    local rc pid own_dir=0 sig
    if [ -z "${PFC_EXIT_STATUS_DIR:-}" ]; then
        PFC_EXIT_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pfc-exit.XXXXXX")
        own_dir=1
    fi
    export PFC_EXIT_STATUS_DIR
    "$@" &
    pid=$!
    for sig in TERM INT HUP QUIT USR1; do
        # shellcheck disable=SC2064
        trap "kill -$sig $pid 2>/dev/null || true" "$sig"
    done
    # `wait` returns early when a trapped signal arrives, so wait again until CMD has exited.
    while :; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - TERM INT HUP QUIT USR1
    local mapped
    mapped=$(pfc_worker_exit "$rc" "$PFC_EXIT_STATUS_DIR")
    [ "$mapped" = "$rc" ] || echo "launch: torchrun exited $rc; the workers' own exit code is $mapped" >&2
    [ "$own_dir" = 0 ] || rm -rf "$PFC_EXIT_STATUS_DIR"
    return "$mapped"
}
