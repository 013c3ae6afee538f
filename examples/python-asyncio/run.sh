#!/usr/bin/env bash
# Runs client.py against the real worker and fake-apptainer. From the workspace root:
#
#     bash examples/python-asyncio/run.sh
#
# Needs python3 (with venv) and a RabbitMQ broker at $AMQP_URL (default: guest/guest on
# 127.0.0.1:5672). The virtualenv is kept at ${EXAMPLE_VENV:-target/python-asyncio-venv}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=python-asyncio
venv="${EXAMPLE_VENV:-target/python-asyncio-venv}"
# shellcheck source=../../tests/worker-against-fake.sh
source "$here/../../tests/worker-against-fake.sh"

delete_names() {
    "$venv_python" - "$@" <<'PY'
import asyncio, os, sys
import aio_pika
async def delete(items):
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        for item in items:
            kind, name = item.split(":", 1)
            if kind == "queue":
                await channel.queue_delete(name)
            else:
                await channel.exchange_delete(name)
asyncio.run(delete(sys.argv[1:]))
PY
}

exchange="example.$$-$(date +%s%N)"
start_worker "$exchange" "$exchange.replies" FAKE_APPTAINER_DELAY_MS=build=300

log "running client.py against exchange $exchange"
"$venv_python" "$here/client.py" --amqp-url "$AMQP_URL" --exchange "$exchange"
