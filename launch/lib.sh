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
