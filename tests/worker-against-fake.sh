# Sourced (bash) by the scripts that run a Python client against the real worker and
# fake-apptainer: tests/acceptance/run.sh and examples/python-asyncio/run.sh. Before sourcing,
# set `here` (the script's directory), `prefix` (its log prefix) and `venv` (the virtualenv to
# create or reuse, with the script's requirements.txt installed). After it:
#
#   root, venv_python        the workspace root (also the working directory), the venv's python
#   AMQP_URL                 exported, default guest/guest on 127.0.0.1:5672
#   tmp, fake_bin            a scratch directory (removed at exit), fake-apptainer
#   start_worker X R [VAR=VALUE...]
#                            starts the worker on exchange X (--exchange; requests are published
#                            to it with the container name as routing key) and reply queue R,
#                            node id $prefix-<pid>, with the extra environment given, and waits
#                            until it consumes
#   delete_names             a function the script defines; called at exit with the worker's
#                            broker names, each `queue:NAME` or `exchange:NAME`, to delete

root="$(cd "$here/../.." && pwd)"
cd "$root"

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
venv_python="$venv/bin/python"

log() { printf '%s: %s\n' "$prefix" "$*" >&2; }

# --- python environment ---------------------------------------------------------------------
if [[ ! -x "$venv_python" ]]; then
    log "creating virtualenv $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
if ! "$venv_python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements.txt"; then
    log "could not install $here/requirements.txt into $venv"
    exit 2
fi

# --- binaries ---------------------------------------------------------------------------------
log "building the worker and fake-apptainer"
cargo build --quiet --workspace --bins
worker_bin="$root/target/debug/orchestrator-worker"
fake_bin="$root/target/debug/fake-apptainer"

# --- the worker, and cleaning up after it --------------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX")"
export APPTAINER_CONFIGDIR="$tmp/cfg"
mkdir -p "$APPTAINER_CONFIGDIR"
worker_pid=""
worker_names=()
log_shown=0

cleanup() {
    local status=$?
    set +e
    if [[ -n "$worker_pid" ]] && kill -0 "$worker_pid" 2>/dev/null; then
        kill -TERM "$worker_pid"
        wait "$worker_pid" 2>/dev/null
    fi
    "$fake_bin" instance stop --all >/dev/null 2>&1
    ((${#worker_names[@]} == 0)) || delete_names "${worker_names[@]}"
    if [[ $status -ne 0 && $log_shown -eq 0 && -f "$tmp/worker.log" ]]; then
        log "last lines of the worker's log:"
        tail -n 30 "$tmp/worker.log" >&2
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_worker() {
    local exchange=$1 reply_queue=$2 node="$prefix-$$"
    shift 2
    # Every name the worker declares (schemas/src/topology.rs; README, "Running a fleet").
    worker_names=("queue:$reply_queue")
    local suffix
    for suffix in place place.start "host.$node" expired dead; do
        worker_names+=("queue:$exchange.$suffix")
    done
    worker_names+=("exchange:$exchange")
    for suffix in unrouted owners nodes all expired; do
        worker_names+=("exchange:$exchange.$suffix")
    done
    log "starting the worker on exchange $exchange as node $node (data in $tmp/data)"
    env NO_COLOR=1 APPTAINER_BIN="$fake_bin" ORCHESTRATOR_APPTAINER_ENV='FAKE_APPTAINER_*' "$@" \
        "$worker_bin" --exchange "$exchange" --node "$node" --reply-queue "$reply_queue" \
        --data-dir "$tmp/data" >"$tmp/worker.log" 2>&1 &
    worker_pid=$!

    local deadline=$((SECONDS + 60))
    until grep -q "consuming requests" "$tmp/worker.log" 2>/dev/null; do
        if ! kill -0 "$worker_pid" 2>/dev/null; then
            log "the worker exited before consuming requests; its log:"
            cat "$tmp/worker.log" >&2
            log_shown=1
            worker_pid=""
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "the worker did not log 'consuming requests' within 60 s; its log:"
            cat "$tmp/worker.log" >&2
            log_shown=1
            exit 1
        fi
        sleep 0.2
    done
}
