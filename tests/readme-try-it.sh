#!/usr/bin/env bash
# Runs the README's "Try it without Apptainer" section exactly as written: the block after
# `<!-- try-it:worker -->` in the background (as the first terminal), then the block after
# `<!-- try-it:client -->` (the second terminal), then Ctrl-C (SIGINT) to the worker. Fails when
# a command fails, when the worker does not exit 0, or when an instance is left running.
#
# The section uses /tmp/try and the exchange try; this script removes /tmp/try before and after,
# deletes the queues and exchanges named try or try.* (the worker's fleet topology on that
# exchange), and apptainer.replies only if it did not exist before. Needs the broker on
# 127.0.0.1:5672 (guest/guest) and rabbitmqctl.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
log() { printf 'readme-try-it: %s\n' "$*" >&2; }

# The fenced block that follows the marker line, without its fences.
block() {
    awk -v marker="<!-- try-it:$1 -->" '
        $0 == marker { found = 1; next }
        found && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }
    ' README.md
}
worker_block="$(block worker)"
client_block="$(block client)"
[[ -n "$worker_block" && -n "$client_block" ]] || { log "README.md lacks a try-it block"; exit 1; }

queue_exists() { rabbitmqctl -q list_queues name | grep -qx "$1"; }
# rabbitmqctl has no delete_exchange; this is what `exchange.delete` does, in RabbitMQ's own shell.
delete_exchange() {
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$1\">>), false, <<\"readme-try-it\">>)."
}
# Everything the worker declared for the exchange try (never another test's: those use
# exchanges of their own names).
delete_try_topology() {
    local name
    for name in $(rabbitmqctl -q list_queues name | grep -E '^try\.'); do
        rabbitmqctl -q delete_queue "$name" >/dev/null 2>&1
    done
    for name in $(rabbitmqctl -q list_exchanges name | grep -E '^try(\.|$)'); do
        delete_exchange "$name" >/dev/null 2>&1
    done
}
replies_existed=0
queue_exists apptainer.replies && replies_existed=1
work="$(mktemp -d)"
worker_pgid=""

cleanup() {
    local status=$?
    set +e
    if [[ -n "$worker_pgid" ]] && kill -0 -- "-$worker_pgid" 2>/dev/null; then
        kill -KILL -- "-$worker_pgid"
    fi
    APPTAINER_CONFIGDIR=/tmp/try/apptainer "$root/target/debug/fake-apptainer" \
        instance stop --all >/dev/null 2>&1
    delete_try_topology
    ((replies_existed)) || rabbitmqctl -q delete_queue apptainer.replies >/dev/null 2>&1
    if [[ $status -ne 0 && -f "$work/worker.log" ]]; then
        log "the worker's log:"
        tail -n 40 "$work/worker.log" >&2
    fi
    rm -rf /tmp/try "$work"
    exit "$status"
}
trap cleanup EXIT
rm -rf /tmp/try
delete_try_topology

# The first terminal: in a process group of its own (job control), so Ctrl-C reaches it.
log "running the worker block"
set -m
bash -euo pipefail -c "$worker_block" >"$work/worker.log" 2>&1 &
worker_pgid=$!
set +m
deadline=$((SECONDS + 1200)) # the block builds everything first
until grep -q "consuming requests" "$work/worker.log"; do
    kill -0 "$worker_pgid" 2>/dev/null || { log "the worker block ended early"; exit 1; }
    ((SECONDS < deadline)) || { log "the worker did not consume within 20 minutes"; exit 1; }
    sleep 0.5
done

# The second terminal.
log "running the client block"
bash -euxo pipefail -c "$client_block"

# Ctrl-C in the first terminal.
kill -INT -- "-$worker_pgid"
deadline=$((SECONDS + 120))
while kill -0 "$worker_pgid" 2>/dev/null; do
    ((SECONDS < deadline)) || { log "the worker did not stop within 120 s of Ctrl-C"; exit 1; }
    sleep 0.2
done
wait "$worker_pgid" || { log "the worker exited with $?"; exit 1; }
worker_pgid=""
left="$(APPTAINER_CONFIGDIR=/tmp/try/apptainer target/debug/fake-apptainer instance list | tail -n +2)"
[[ -z "$left" ]] || { log "instances left running: $left"; exit 1; }
log "every command of the README's try-it section worked"
