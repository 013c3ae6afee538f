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
prefix=acceptance
venv="${ACCEPTANCE_VENV:-target/acceptance-venv}"
# shellcheck source=../worker-against-fake.sh
source "$here/../worker-against-fake.sh"

delete_names() {
    "$venv_python" - "$@" <<'PY'
import os, sys
import pika
try:
    connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
    channel = connection.channel()
    for item in sys.argv[1:]:
        kind, name = item.split(":", 1)
        if kind == "queue":
            channel.queue_delete(queue=name)
        else:
            channel.exchange_delete(exchange=name)
    connection.close()
except Exception as e:
    print(f"acceptance: could not delete the test's queues and exchanges: {e!r}", file=sys.stderr)
PY
}

suffix="$$-$(date +%s%N)"
exchange="acceptance.$suffix"
reply_queue="acceptance.replies.$suffix"
export FAKE_APPTAINER_LOG="$tmp/fake.log"
start_worker "$exchange" "$reply_queue"

# --- the test -----------------------------------------------------------------------------------
status=0
"$venv_python" "$here/plain_amqp_client.py" \
    --exchange "$exchange" --reply-queue "$reply_queue" --data-dir "$tmp/data" \
    --fake-log "$FAKE_APPTAINER_LOG" --amqp-url "$AMQP_URL" \
    --schema "$root/schemas/json/reply.json" || status=$?
exit "$status"
