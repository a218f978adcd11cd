#!/usr/bin/env bash
# One-click start of the embedding and reranking services (see README, "One-click start").
#
#   ./start_embed_server.sh                        the default profile (high, or $EMBED_PROFILE)
#   ./start_embed_server.sh --profile demo         a profile (--help lists them, from embed_ops/profiles.py)
#   ./start_embed_server.sh qwen3_8b_embed bge_embed   the services named
#   ./start_embed_server.sh ... --detach           start, wait for /health, return (services keep running)
#   ./start_embed_server.sh ... --gpu-memory 24GiB a GPU memory budget the services share (or 0.9 of the card)
#   ./start_embed_server.sh status | stop [NAME...]
#
# Services, ports, classes, profiles and the memory estimate come from runners/ through
# `python -m embed_ops.launcher`; this script only starts one supervisor per service, which runs
# `bentoml serve` and restarts it when it dies (embed_ops/supervisor.py). Ctrl-C stops the services
# this run started, and nothing else.
set -uo pipefail

REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO" || exit 1
PYTHON="${EMBED_PYTHON:-$(command -v python || command -v python3)}"
LOG_DIR="${EMBED_LOG_DIR:-$REPO/logs}"
RUN_DIR="${EMBED_RUN_DIR:-$REPO/.run}"
START_TIMEOUT="${EMBED_START_TIMEOUT:-1800}"

launcher() { "$PYTHON" -m embed_ops.launcher "$@"; }

usage() { launcher usage; }  # generated from the profile and service tables

# A session of its own per service, so that a Ctrl-C at this terminal reaches this script only.
# `exec`: the pid `$!` names is then bentoml's own, not a subshell's.
detached() {
    if command -v setsid >/dev/null 2>&1; then
        exec setsid "$@"
    else
        exec "$PYTHON" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@"
    fi
}

command="start"
case "${1:-}" in
    start | stop | status) command="$1"; shift ;;
esac
profile=""
gpu_memory=""
detach=0
names=()
while (($#)); do
    case "$1" in
        --profile) profile="${2:?--profile needs a name}"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        --gpu-memory) gpu_memory="${2:?--gpu-memory needs a size (24GiB) or a fraction of the card (0.9)}"; shift 2 ;;
        --gpu-memory=*) gpu_memory="${1#*=}"; shift ;;
        -d | --detach) detach=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) names+=("$1"); shift ;;
    esac
done

case "$command" in
    stop) launcher stop --run-dir "$RUN_DIR" "${names[@]}"; exit $? ;;
    status) launcher status --run-dir "$RUN_DIR" --log-dir "$LOG_DIR"; exit $? ;;
esac

mkdir -p "$LOG_DIR" "$RUN_DIR"
plan="$(launcher plan --run-dir "$RUN_DIR" ${profile:+--profile "$profile"} ${gpu_memory:+--gpu-memory "$gpu_memory"} \
    "${names[@]}")" || exit $?

started=()          # what this run started: the only services Ctrl-C stops
waiting=()
refused=0

watcher=""
stop_started() {
    trap - INT TERM
    [[ -n "$watcher" ]] && kill "$watcher" 2>/dev/null
    local name running=()
    for name in "${started[@]}"; do
        [[ -f "$RUN_DIR/$name.pid" ]] && running+=("$name")
    done
    if ((${#running[@]})); then
        echo
        echo "Stopping the services this run started: ${running[*]}"
        launcher stop --run-dir "$RUN_DIR" "${running[@]}"
    fi
}
trap 'stop_started; exit 130' INT
trap 'stop_started; exit 143' TERM

while IFS=$'\t' read -r kind name class port state; do
    case "$kind" in
        env) export "$name=$class" ;;  # env KEY VALUE
        service)
            case "$state" in
                start)
                    log="$LOG_DIR/$name.log"
                    echo "starting $name: bentoml serve service:$class --port $port  (log: $log)"
                    # BENTOML_CONTAINERIZED: BentoML does not respawn a worker that dies; the supervisor
                    # restarts the whole `bentoml serve` instead, and gives up on a model that cannot load.
                    # BENTOML_HOME per service: BentoML keeps its Prometheus files there, and a server
                    # that starts empties them, which would wipe the metrics of the services before it.
                    : >"$log"  # the supervisor appends to it, each restart after the last
                    BENTOML_CONTAINERIZED=true BENTOML_HOME="$RUN_DIR/bentoml-home/$name" \
                        detached "$PYTHON" -m embed_ops.launcher supervise --run-dir "$RUN_DIR" \
                        --log-dir "$LOG_DIR" "$name" "service:$class" --port "$port" >>"$log" 2>&1 </dev/null &
                    printf '%s %s %s\n' "$!" "$class" "$port" >"$RUN_DIR/$name.pid"
                    started+=("$name")
                    waiting+=("$name")
                    ;;
                running) waiting+=("$name") ;;
                *) refused=1 ;;  # port taken by something else: the plan said so
            esac
            ;;
    esac
done <<<"$plan"

if ((${#waiting[@]} == 0)); then
    echo "nothing was started" >&2
    exit 1
fi
echo "waiting for /health of: ${waiting[*]}"
launcher wait --run-dir "$RUN_DIR" --log-dir "$LOG_DIR" --timeout "$START_TIMEOUT" "${waiting[@]}"
status=$?
((refused)) && status=1

alive=()
for name in "${started[@]}"; do
    [[ -f "$RUN_DIR/$name.pid" ]] && alive+=("$name")
done
if ((detach)) || ((${#alive[@]} == 0)); then
    ((${#alive[@]})) && echo "Running in the background; ./start_embed_server.sh status | stop"
    exit "$status"
fi

echo "Press Ctrl-C to stop the services this run started (${alive[*]})."
# Says when a service dies, is restarted, or gives up; returns once none of them is left. In the
# background, so that `wait` (unlike a foreground command) lets the Ctrl-C trap run at once.
launcher watch --run-dir "$RUN_DIR" --log-dir "$LOG_DIR" "${alive[@]}" &
watcher=$!
wait "$watcher"
exit 1
