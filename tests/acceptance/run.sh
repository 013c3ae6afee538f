#!/usr/bin/env bash
# Acceptance check: the worker, run against fake-apptainer, answers a plain AMQP client (pika)
# correctly for every operation. Run from the workspace root:
#
#     bash tests/acceptance/run.sh
#
# Needs python3 (with venv) and a RabbitMQ broker at $AMQP_URL (default: guest/guest on
# 127.0.0.1:5672). The virtualenv is kept at ${ACCEPTANCE_VENV:-target/acceptance-venv} and reused.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
venv="${ACCEPTANCE_VENV:-target/acceptance-venv}"
python="${PYTHON:-python3}"

log() { printf 'acceptance: %s\n' "$*" >&2; }

# --- python environment ---------------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$here/requirements.txt"; then
    log "could not install $here/requirements.txt into $venv"
    exit 2
fi

# --- binaries ---------------------------------------------------------------------------------
log "building the worker and fake-apptainer"
cargo build --quiet -p apptainer-orchestrator-worker -p apptainer-orchestrator-tests --bins
worker_bin="$root/target/debug/orchestrator-worker"
fake_bin="$root/target/debug/fake-apptainer"

# --- worker -------------------------------------------------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/acceptance.XXXXXX")"
suffix="$$-$(date +%s%N)"
queue="acceptance.requests.$suffix"
reply_queue="acceptance.replies.$suffix"
worker_pid=""
log_shown=0
export APPTAINER_CONFIGDIR="$tmp/cfg"
export FAKE_APPTAINER_LOG="$tmp/fake.log"
mkdir -p "$APPTAINER_CONFIGDIR"

cleanup() {
    local status=$?
    set +e
    if [[ -n "$worker_pid" ]] && kill -0 "$worker_pid" 2>/dev/null; then
        kill -TERM "$worker_pid"
        wait "$worker_pid" 2>/dev/null
    fi
    "$fake_bin" instance stop --all >/dev/null 2>&1
    "$venv/bin/python" - "$queue" "$reply_queue" "$queue.dead" <<'PY'
import os, sys
import pika
try:
    connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
    channel = connection.channel()
    for queue in sys.argv[1:]:
        channel.queue_delete(queue=queue)
    connection.close()
except Exception as e:
    print(f"acceptance: could not delete the test queues: {e!r}", file=sys.stderr)
PY
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

log "starting the worker on queue $queue (data in $tmp/data)"
NO_COLOR=1 APPTAINER_BIN="$fake_bin" ORCHESTRATOR_APPTAINER_ENV="FAKE_APPTAINER_*" "$worker_bin" \
    --queue "$queue" --reply-queue "$reply_queue" --data-dir "$tmp/data" \
    >"$tmp/worker.log" 2>&1 &
worker_pid=$!

deadline=$((SECONDS + 60))
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

# --- the test -----------------------------------------------------------------------------------
status=0
"$venv/bin/python" "$here/plain_amqp_client.py" \
    --queue "$queue" --reply-queue "$reply_queue" --data-dir "$tmp/data" \
    --fake-log "$FAKE_APPTAINER_LOG" --amqp-url "$AMQP_URL" \
    --schema "$root/schemas/json/reply.json" || status=$?
exit "$status"
