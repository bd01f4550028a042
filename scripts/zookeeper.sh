#!/usr/bin/env bash
# A private ZooKeeper for tests and local clusters (Debian's `zookeeper` package, run as a plain process).
#
#   scripts/zookeeper.sh start DIR PORT   config, data and log under DIR; returns once it answers on PORT
#   scripts/zookeeper.sh stop DIR         stops it (DIR keeps the data: a later start restores the sessions)
set -euo pipefail

JAR=/usr/share/java/zookeeper.jar
usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }

answers() {   # ZooKeeper's "ruok" four-letter command: "imok" once it serves clients
    { exec 3<>"/dev/tcp/127.0.0.1/$1" && printf ruok >&3 && timeout 1 cat <&3; } 2>/dev/null | grep -q imok
}

start() {
    local dir=$1 port=$2
    [ -f "$JAR" ] || { echo "ZooKeeper is not installed ($JAR missing): run 'make zookeeper'" >&2; exit 1; }
    mkdir -p "$dir/data"
    # A short tick so sessions can be short; the upper bound leaves room for clients' 10 s sessions.
    cat > "$dir/zoo.cfg" <<CFG
tickTime=500
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
maxSessionTimeout=60000
admin.enableServer=false
4lw.commands.whitelist=ruok
CFG
    nohup java -Xmx128m -XX:+UseSerialGC -Dzookeeper.log.dir="$dir" -Dzookeeper.root.logger=INFO,CONSOLE \
        -cp "$JAR:/etc/zookeeper/conf" org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg" \
        > "$dir/zookeeper.log" 2>&1 < /dev/null &
    echo $! > "$dir/zookeeper.pid"
    for _ in $(seq 600); do   # up to a minute: the JVM starts slowly on a busy machine
        answers "$port" && { echo "zookeeper on 127.0.0.1:$port (pid $(cat "$dir/zookeeper.pid"))"; return 0; }
        kill -0 "$(cat "$dir/zookeeper.pid")" 2>/dev/null || { echo "zookeeper exited:" >&2; tail -20 "$dir/zookeeper.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "zookeeper did not answer on port $port within a minute" >&2; exit 1
}

stop() {
    local dir=$1 pid
    [ -f "$dir/zookeeper.pid" ] || return 0
    pid=$(cat "$dir/zookeeper.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/zookeeper.pid"
}

case "${1:-}" in
    start) [ $# -eq 3 ] || usage; start "$2" "$3" ;;
    stop) [ $# -eq 2 ] || usage; stop "$2" ;;
    *) usage ;;
esac
