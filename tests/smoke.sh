#!/usr/bin/env bash
# Start the product the way README.md tells a new user to, then check it from
# outside as a browser would (tests/smoke_check.py, stdlib only).
#
# The README's first command, taken from its first ```sh block, runs in a
# fresh clone of the repository's HEAD (committed work only, as a new user
# gets it; never the dev .venv) with a fresh FUNCNODES_CONFIG_DIR: it creates
# a venv without extras, installs the package and starts `funcnodes-tw`.
# Then `twistd -n funcnodes-worker` from that same venv gets the same checks.
# On SIGTERM each worker must stop cleanly, log its end and remove its .p
# file. Everything started here is stopped, and the temporary directory
# removed, on exit.
#
#     tests/smoke.sh        (SMOKE_TIMEOUT: seconds for the install + start, default 900)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
checker="$repo/tests/smoke_check.py"
start_timeout=${SMOKE_TIMEOUT:-900}
stop_timeout=20
work=$(mktemp -d "${TMPDIR:-/tmp}/funcnodes-tw-smoke.XXXXXX")
started=()
checking=

cleanup() {
    local pid i
    [ -z "$checking" ] || kill "$checking" 2>/dev/null || true
    # Each command runs under `timeout`, which leads its own process group.
    for pid in "${started[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    for pid in "${started[@]}"; do
        for i in $(seq 50); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    echo "smoke: FAILED: $*" >&2
    exit 1
}

stat_field() {  # PID N: field N of /proc/PID/stat after the command name (1 state, 3 pgid)
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f"$2"
}

running() {  # not gone and not a zombie waiting for us
    local state
    state=$(stat_field "$1" 1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# check NAME ACCEPTED_STATUSES COMMAND...: run COMMAND in the clean copy in the
# background, check it from outside, SIGTERM it, check how it ended.
check() {
    local name=$1 accepted=$2
    shift 2
    local config="$work/$name-config" log="$work/$name.log" pid uuid worker status i
    mkdir -p "$config"
    (cd "$work/repo" && exec env -u PYTHONPATH -u VIRTUAL_ENV FUNCNODES_CONFIG_DIR="$config" \
        timeout "$start_timeout" "$@") >"$log" 2>&1 &
    pid=$!
    started+=("$pid")
    echo "smoke: $name: started $* (log: $log)"
    # In the background: `wait` lets a signal to this script through at once.
    python3 "$checker" --log "$log" --config-dir "$config" --launcher-pid "$pid" \
        --wait "$start_timeout" >"$work/$name.answer" &
    checking=$!
    if ! wait "$checking"; then
        tail -n 40 "$log" >&2
        fail "$name: the running worker failed its checks"
    fi
    checking=
    read -r uuid worker <"$work/$name.answer"
    [ "$(stat_field "$worker" 3)" = "$pid" ] || fail "$name: pid $worker was not started here"
    echo "smoke: $name: worker $uuid (pid $worker) passed; sending SIGTERM"
    kill -TERM "$worker"
    for i in $(seq $((stop_timeout * 10))); do
        running "$pid" || break
        sleep 0.1
    done
    running "$pid" && fail "$name: still running $stop_timeout s after SIGTERM"
    status=0
    wait "$pid" || status=$?
    case " $accepted " in
        *" $status "*) ;;
        *) tail -n 40 "$log" >&2; fail "$name: exit status $status after SIGTERM" ;;
    esac
    [ -e "$config/workers/worker_$uuid.p" ] && fail "$name: worker_$uuid.p left behind"
    grep -qF "Worker $uuid stopped" "$log" || fail "$name: its log does not say it stopped"
    echo "smoke: $name: clean exit (status $status), worker_$uuid.p removed"
}

first=$(sed -n '/^```sh$/{n;p;q}' "$repo/README.md")
[ -n "$first" ] || fail "no command in README.md's first sh block"

git clone -q "$repo" "$work/repo"

check readme 0 bash -c "$first"
# twistd re-raises the SIGTERM it stopped on after its clean shutdown
# (Twisted's own behaviour; systemd counts it as success): 128 + 15.
check twistd "0 143" "$work/repo/.venv/bin/twistd" -n funcnodes-worker
echo "smoke: passed"
