# shellcheck shell=bash
# Sourced by up.sh, down.sh and node.sh: where a set of private RabbitMQ nodes lives and how to
# run the installed rabbitmq-server's commands against one of them. Nothing here may reach the
# shared broker (rabbit@localhost, AMQP 5672, distribution 25672, /var/lib/rabbitmq): every
# command names its node with -n, and runs with this set's own HOME, whose Erlang cookie the
# shared broker does not know.
#
#   ORCH_TEST_BROKER_BASE_PORT  AMQP port of node 1 (default 5681); node i listens on BASE+i-1,
#                               its Erlang distribution on BASE+20000+i-1, and the command-line
#                               tools of this set on BASE+20010..BASE+20019. Sets that run at
#                               the same time need bases at least 20 apart.
#   ORCH_TEST_BROKER_DIR        the folder that holds everything (default
#                               /tmp/orch-test-brokers-BASE); down.sh removes it.

RABBITMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
BASE=${ORCH_TEST_BROKER_BASE_PORT:-5681}
DIR=${ORCH_TEST_BROKER_DIR:-/tmp/orch-test-brokers-$BASE}
MAX_NODES=3

say() { printf 'cluster: %s\n' "$*" >&2; }
die() {
    printf 'cluster: error: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf 'cluster: fix: %s\n' "$line" >&2; done
    exit 1
}

if ! [[ $BASE =~ ^[0-9]+$ ]] || ((BASE < 1024 || BASE + 20019 > 65535)); then
    die "ORCH_TEST_BROKER_BASE_PORT=$BASE is not a port between 1024 and 45516" \
        "unset it (default 5681) or pick another, e.g. ORCH_TEST_BROKER_BASE_PORT=5701"
fi
# Ours must avoid the shared broker's: epmd 4369, AMQP 5672, distribution 25672, and the
# range its command-line tools use by default, 35672..35682.
for ours in $(seq "$BASE" $((BASE + MAX_NODES - 1))) $(seq $((BASE + 20000)) $((BASE + 20019))); do
    if ((ours == 4369 || ours == 5672 || ours == 25672 || (ours >= 35672 && ours <= 35682))); then
        die "ORCH_TEST_BROKER_BASE_PORT=$BASE puts port $ours, which the shared broker uses, in this set" \
            "pick another base port, e.g. the default 5681"
    fi
done
case $DIR in
    /* ) ;;
    * ) die "ORCH_TEST_BROKER_DIR=$DIR is not an absolute path" "give an absolute path under /tmp" ;;
esac
case $DIR in
    / | /tmp | /tmp/ | /var/lib/rabbitmq* | /etc* | /usr* | /var/log/rabbitmq* )
        die "ORCH_TEST_BROKER_DIR=$DIR would be a shared directory" "give a folder of its own, e.g. /tmp/orch-test-brokers-$BASE" ;;
esac

node_name() { printf 'orch-test-%s-%s@localhost' "$BASE" "$1"; }
node_port() { printf '%s' $((BASE + $1 - 1)); }
node_dist_port() { printf '%s' $((BASE + 20000 + $1 - 1)); }
node_dir() { printf '%s/node%s' "$DIR" "$1"; }
node_url() { printf 'amqp://guest:guest@127.0.0.1:%s/%%2f' "$(node_port "$1")"; }

# The user the nodes run as: `rabbitmq` when we are root (as the installed service does),
# ourselves otherwise.
if [[ $(id -u) == 0 ]]; then
    id rabbitmq >/dev/null 2>&1 ||
        die "there is no rabbitmq user" "install RabbitMQ (apt-get install rabbitmq-server)"
    NODE_USER=rabbitmq
else
    NODE_USER=$(id -un)
fi

# Runs a command (a path: one of the installed rabbitmq-server's tools, or `timeout` around
# one) for node $1, as NODE_USER, with the node's own environment file and this set's HOME
# (cookie). Only loopback: epmd and distribution are bound to 127.0.0.1.
rmq() {
    local i=$1
    shift
    local -a as_user=()
    if [[ $(id -u) == 0 ]]; then as_user=(runuser -u "$NODE_USER" --); fi
    (cd "$DIR" && "${as_user[@]}" env -u RABBITMQ_ENV_LOADED -u ERL_FLAGS \
        HOME="$DIR/home" \
        RABBITMQ_CONF_ENV_FILE="$(node_dir "$i")/rabbitmq-env.conf" \
        "$@")
}

# True when port $1 on 127.0.0.1 accepts a TCP connection.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid of node $1's Erlang VM when it runs, by its pid file; only a beam process whose
# command line names this set's HOME counts, so a stale pid file never leads to another process.
node_pid() {
    local pid_file pid
    pid_file="$(node_dir "$1")/node.pid"
    [[ -s $pid_file ]] || return 1
    pid=$(tr -dc '0-9' <"$pid_file")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    [[ $cmdline == *beam*" -home $DIR/home "* ]] || return 1
    printf '%s' "$pid"
}

# Seconds each wait is bounded by.
TIMEOUT=${ORCH_TEST_BROKER_TIMEOUT:-120}

# The number of nodes up.sh recorded for this folder (0 when there is none).
recorded_nodes() { if [[ -e $DIR/nodes ]]; then wc -l <"$DIR/nodes"; else echo 0; fi; }

# Starts node $1's Erlang VM unless it runs; returns at once (see await_port).
start_node() {
    local i=$1 port dist
    if node_pid "$i" >/dev/null; then return 0; fi
    port=$(node_port "$i")
    dist=$(node_dist_port "$i")
    for p in "$port" "$dist"; do
        if port_open "$p"; then
            die "port $p (node $i of $DIR) is taken by another process" \
                "find it with: ss -ltnp 'sport = :$p'; or use other ports: ORCH_TEST_BROKER_BASE_PORT=$((BASE + 20)) (and another ORCH_TEST_BROKER_DIR)"
        fi
    done
    say "starting $(node_name "$i") (AMQP $port, distribution $dist)"
    rmq "$i" "$RABBITMQ_BIN/rabbitmq-server" -detached >>"$(node_dir "$i")/log/startup.log" 2>&1 ||
        die "rabbitmq-server did not start $(node_name "$i")" "read $(node_dir "$i")/log/startup.log"
}

# Waits until node $1's AMQP port answers (the listener opens last, when the node has booted),
# or, with $2 = closed, until it no longer does.
await_port() {
    local i=$1 want=${2:-open} deadline=$((SECONDS + TIMEOUT))
    while :; do
        if port_open "$(node_port "$i")"; then [[ $want == open ]] && return 0; else [[ $want == closed ]] && return 0; fi
        if ((SECONDS >= deadline)); then
            die "AMQP port $(node_port "$i") of $(node_name "$i") is not $want after ${TIMEOUT}s" \
                "read $(node_dir "$i")/log/ (startup.log, ctl.log, $(node_name "$i").log); then tests/cluster/down.sh"
        fi
        sleep 0.2
    done
}

# rabbitmqctl on node $1 only, bounded; its output goes to the node's ctl.log.
ctl() {
    local i=$1
    shift
    rmq "$i" timeout "$TIMEOUT" "$RABBITMQ_BIN/rabbitmqctl" -q -n "$(node_name "$i")" "$@" \
        >>"$(node_dir "$i")/log/ctl.log" 2>&1 ||
        die "rabbitmqctl $* failed on $(node_name "$i") (or took over ${TIMEOUT}s)" \
            "read $(node_dir "$i")/log/ctl.log; then tests/cluster/down.sh and up.sh again"
}

# Node $1's cluster_status as JSON (one line), or nothing when it does not answer.
cluster_status() {
    rmq "$1" timeout "$TIMEOUT" "$RABBITMQ_BIN/rabbitmq-diagnostics" -q -n "$(node_name "$1")" \
        cluster_status --formatter json 2>/dev/null || true
}

# The number of running nodes in node $1's cluster_status.
running_nodes() {
    cluster_status "$1" | { grep -o '"running_nodes":\[[^]]*\]' || true; } | { grep -o '@' || true; } | wc -l
}

# True when node $2 already counts node $1 as a member of its cluster (a disk node).
is_member() {
    cluster_status "$2" | grep -o '"disk_nodes":\[[^]]*\]' | grep -q "\"$(node_name "$1")\""
}
