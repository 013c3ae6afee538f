#!/usr/bin/env bash
# Stops the private RabbitMQ nodes that tests/cluster/up.sh started in ORCH_TEST_BROKER_DIR
# (each by its node name, with rabbitmqctl stop; a node that does not stop within the bound is
# killed by its own pid file's pid) and removes the folder. Never touches the shared broker on
# 5672. Safe to run again: nothing to stop or remove is not an error.
#
#   tests/cluster/down.sh
#   ORCH_TEST_BROKER_BASE_PORT, ORCH_TEST_BROKER_DIR: as for up.sh (see common.sh)
#   ORCH_TEST_BROKER_TIMEOUT    seconds to wait for the nodes to stop (default 60)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
TIMEOUT=${ORCH_TEST_BROKER_TIMEOUT:-60}

if [[ ! -e $DIR ]]; then
    say "nothing to stop: $DIR does not exist"
    exit 0
fi
# Only a folder that up.sh made is removed, whatever ORCH_TEST_BROKER_DIR says.
[[ -e $DIR/home/.erlang.cookie || -e $DIR/nodes ]] ||
    die "$DIR was not made by tests/cluster/up.sh (no home/.erlang.cookie, no nodes file); leaving it alone" \
        "check ORCH_TEST_BROKER_DIR; remove the folder yourself if it is yours"

# The nodes this folder holds, by the names up.sh wrote into their environment files.
stopping=()
for ((i = 1; i <= MAX_NODES; i++)); do
    env_file="$(node_dir "$i")/rabbitmq-env.conf"
    [[ -e $env_file ]] || continue
    node_pid "$i" >/dev/null || continue
    name=$(sed -n 's/^export RABBITMQ_NODENAME=//p' "$env_file")
    [[ $name == orch-test-* ]] || die "$env_file names node '$name', which is not a private test node" \
        "remove $DIR yourself after checking which node it belongs to"
    say "stopping $name"
    rmq "$i" timeout "$TIMEOUT" "$RABBITMQ_BIN/rabbitmqctl" -q -n "$name" stop >>"$(node_dir "$i")/log/ctl.log" 2>&1 &
    stopping+=("$i")
done
wait || true

deadline=$((SECONDS + TIMEOUT))
for i in "${stopping[@]}"; do
    while pid=$(node_pid "$i"); do
        if ((SECONDS >= deadline)); then
            say "node $i (pid $pid) did not stop within ${TIMEOUT}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            node_pid "$i" >/dev/null && die "node $i (pid $pid) survived SIGKILL" "kill -KILL $pid, then run tests/cluster/down.sh again"
            break
        fi
        sleep 0.2
    done
done
rm -rf -- "$DIR"
say "stopped ${#stopping[@]} node(s); removed $DIR"
