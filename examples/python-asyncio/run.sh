#!/usr/bin/env bash
# Runs client.py against the real worker and fake-apptainer. From the workspace root:
#
#     bash examples/python-asyncio/run.sh
#
# Needs python3 (with venv) and a RabbitMQ broker at $AMQP_URL (default: guest/guest on
# 127.0.0.1:5672). The virtualenv is kept at ${EXAMPLE_VENV:-target/python-asyncio-venv}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
venv="${EXAMPLE_VENV:-target/python-asyncio-venv}"
log() { printf 'python-asyncio: %s\n' "$*" >&2; }

[[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"

log "building the worker and fake-apptainer"
cargo build --quiet -p apptainer-orchestrator-worker -p apptainer-orchestrator-tests --bins
fake_bin="$root/target/debug/fake-apptainer"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/python-asyncio.XXXXXX")"
queue="example.requests.$$-$(date +%s%N)"
export APPTAINER_CONFIGDIR="$tmp/cfg"
mkdir -p "$APPTAINER_CONFIGDIR"
worker_pid=""

cleanup() {
    local status=$?
    set +e
    [[ -n "$worker_pid" ]] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
    "$fake_bin" instance stop --all >/dev/null 2>&1
    "$venv/bin/python" - "$queue" "$queue.replies" "$queue.dead" <<'PY'
import asyncio, os, sys
import aio_pika
async def delete(names):
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
asyncio.run(delete(sys.argv[1:]))
PY
    if [[ $status -ne 0 && -f "$tmp/worker.log" ]]; then
        log "last lines of the worker's log:"
        tail -n 30 "$tmp/worker.log" >&2
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT

NO_COLOR=1 APPTAINER_BIN="$fake_bin" FAKE_APPTAINER_DELAY_MS=build=300 \
    ORCHESTRATOR_APPTAINER_ENV='FAKE_APPTAINER_*' \
    "$root/target/debug/orchestrator-worker" \
    --queue "$queue" --reply-queue "$queue.replies" --data-dir "$tmp/data" \
    >"$tmp/worker.log" 2>&1 &
worker_pid=$!

deadline=$((SECONDS + 60))
until grep -q "consuming requests" "$tmp/worker.log" 2>/dev/null; do
    kill -0 "$worker_pid" 2>/dev/null || { log "the worker exited"; worker_pid=""; exit 1; }
    ((SECONDS < deadline)) || { log "the worker did not start consuming within 60 s"; exit 1; }
    sleep 0.2
done

log "running client.py against queue $queue"
"$venv/bin/python" "$here/client.py" --amqp-url "$AMQP_URL" --queue "$queue"
