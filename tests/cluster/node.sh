#!/usr/bin/env bash
# Acts on one node of a private set that tests/cluster/up.sh started (same
# ORCH_TEST_BROKER_BASE_PORT and ORCH_TEST_BROKER_DIR), and on no other; every wait is bounded
# by ORCH_TEST_BROKER_TIMEOUT (default 120 s).
#
#   tests/cluster/node.sh I stop_app     rabbitmqctl stop_app; returns when its AMQP port is closed
#   tests/cluster/node.sh I start_app    rabbitmqctl start_app; returns when its AMQP port answers
#   tests/cluster/node.sh I kill         SIGKILL of its Erlang VM; returns when the VM is gone
#   tests/cluster/node.sh I start        starts its VM again (after kill), joined as before;
#                                        returns when its AMQP port answers
#   tests/cluster/node.sh I pid          prints the pid of its Erlang VM (exit 1 when it is down)
#   tests/cluster/node.sh I rabbitmqctl|rabbitmq-diagnostics|rabbitmq-queues ARGS...
#                                        that command with -n NODE; its output on stdout
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

usage="tests/cluster/node.sh I stop_app|start_app|kill|start|pid|rabbitmqctl ARGS...|rabbitmq-diagnostics ARGS...|rabbitmq-queues ARGS..."
(($# >= 2)) || die "missing arguments" "$usage"
i=$1
action=$2
shift 2
n=$(recorded_nodes)
((n > 0)) || die "no private nodes in $DIR" "start them with tests/cluster/up.sh (same ORCH_TEST_BROKER_BASE_PORT and ORCH_TEST_BROKER_DIR)"
if ! [[ $i =~ ^[0-9]+$ ]] || ((i < 1 || i > n)); then
    die "node $i is not one of the $n node(s) in $DIR" "give a node number from 1 to $n"
fi

case $action in
    stop_app)
        ctl "$i" stop_app
        await_port "$i" closed
        ;;
    start_app)
        ctl "$i" start_app
        await_port "$i" open
        ;;
    kill)
        if pid=$(node_pid "$i"); then
            say "killing $(node_name "$i") (pid $pid)"
            kill -KILL "$pid"
            deadline=$((SECONDS + TIMEOUT))
            while node_pid "$i" >/dev/null; do
                ((SECONDS < deadline)) || die "pid $pid of $(node_name "$i") survived SIGKILL for ${TIMEOUT}s" "check it with ps -p $pid"
                sleep 0.1
            done
        fi
        await_port "$i" closed
        ;;
    start)
        start_node "$i"
        await_port "$i" open
        ;;
    pid)
        node_pid "$i" || exit 1
        echo
        ;;
    rabbitmqctl | rabbitmq-diagnostics | rabbitmq-queues)
        rmq "$i" timeout "$TIMEOUT" "$RABBITMQ_BIN/$action" -n "$(node_name "$i")" "$@"
        ;;
    *) die "unknown action '$action'" "$usage" ;;
esac
