#!/usr/bin/env bash
# Starts N (1 or 3, default 3) private RabbitMQ nodes of the installed rabbitmq-server for
# tests, on loopback only, never touching the shared broker on 5672; with 3, joins them into
# one cluster and waits until it reports 3 running nodes. The last line of stdout is the AMQP
# URLs, comma-separated. Safe to run again: a node that runs is left alone (one that was
# stopped or killed is started again), and a node that is already a member is not joined again.
# tests/cluster/down.sh stops them and removes the folder; tests/cluster/node.sh acts on one.
#
#   tests/cluster/up.sh [N]
#   ORCH_TEST_BROKER_BASE_PORT, ORCH_TEST_BROKER_DIR, ORCH_TEST_BROKER_TIMEOUT: see common.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

N=${1:-3}
[[ $N == 1 || $N == 3 ]] || die "N=$N: only 1 or 3 nodes" "run tests/cluster/up.sh 1 or tests/cluster/up.sh 3"
[[ -x $RABBITMQ_BIN/rabbitmq-server ]] ||
    die "$RABBITMQ_BIN/rabbitmq-server not found" \
        "install RabbitMQ (apt-get install rabbitmq-server) or set RABBITMQ_BIN to its bin directory"
recorded=$(recorded_nodes)
((recorded == 0 || recorded == N)) ||
    die "$DIR already holds a set of $recorded node(s), not $N" \
        "run tests/cluster/down.sh with the same ORCH_TEST_BROKER_DIR and ORCH_TEST_BROKER_BASE_PORT first"

# --- the folder: one HOME (cookie) for the set, one directory per node ----------------------
mkdir -p "$DIR/home"
if [[ ! -s $DIR/home/.erlang.cookie ]]; then
    # A cookie of this set's own, so its nodes and commands can reach no other node.
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-F' >"$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
fi
for ((i = 1; i <= N; i++)); do
    nd=$(node_dir "$i")
    mkdir -p "$nd/mnesia" "$nd/log"
    cat >"$nd/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$(node_port "$i")
log.console = false
log.file.level = info
CONF
    # No plugins: nothing to enable, and each node boots faster.
    printf '[].\n' >"$nd/enabled_plugins"
    cat >"$nd/rabbitmq-env.conf" <<ENV
# Node $i of the private set in $DIR, written by tests/cluster/up.sh.
# One command on it: tests/cluster/node.sh $i rabbitmqctl status (with the same
# ORCH_TEST_BROKER_BASE_PORT and ORCH_TEST_BROKER_DIR).
export RABBITMQ_NODENAME=$(node_name "$i")
export RABBITMQ_CONFIG_FILE=$nd/rabbitmq.conf
export RABBITMQ_ADVANCED_CONFIG_FILE=$nd/advanced.config
export RABBITMQ_ENABLED_PLUGINS_FILE=$nd/enabled_plugins
export RABBITMQ_MNESIA_BASE=$nd/mnesia
export RABBITMQ_LOG_BASE=$nd/log
export RABBITMQ_PID_FILE=$nd/node.pid
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$(node_port "$i")
export RABBITMQ_DIST_PORT=$(node_dist_port "$i")
export RABBITMQ_CTL_DIST_PORT_MIN=$((BASE + 20010))
export RABBITMQ_CTL_DIST_PORT_MAX=$((BASE + 20019))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
ENV
done
for ((i = 1; i <= N; i++)); do
    printf '%s %s %s\n' "$i" "$(node_name "$i")" "$(node_port "$i")"
done >"$DIR/nodes"
chown -R "$NODE_USER" "$DIR"

# --- start, join, wait ------------------------------------------------------------------------
for ((i = 1; i <= N; i++)); do start_node "$i"; done
for ((i = 1; i <= N; i++)); do await_port "$i"; done
for ((i = 2; i <= N; i++)); do
    is_member "$i" 1 && continue
    say "joining $(node_name "$i") to $(node_name 1)"
    ctl "$i" stop_app
    ctl "$i" join_cluster "$(node_name 1)"
    ctl "$i" start_app
    await_port "$i"
done
deadline=$((SECONDS + TIMEOUT))
until (($(running_nodes 1) == N)); do
    ((SECONDS < deadline)) ||
        die "$(node_name 1) does not report $N running nodes after ${TIMEOUT}s" \
            "read the logs under $DIR/node*/log/; then tests/cluster/down.sh and up.sh again"
    sleep 1
done
say "$N node(s) running in $DIR"

urls=()
for ((i = 1; i <= N; i++)); do urls+=("$(node_url "$i")"); done
(IFS=,; printf '%s\n' "${urls[*]}")
