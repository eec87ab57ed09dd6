#!/usr/bin/env bash
# Starts a throwaway MariaDB on 127.0.0.1 for trying the convertor's dedup by hand (the Rust
# tests start their own). Data lives in a temp dir that is removed when the server stops.
#
# Usage: tests/services/mariadb.sh [--port N] [-- COMMAND ARGS...]
#   Without a command: prints the DSN and serves until Ctrl-C.
#   With a command: runs it with OBD_DEDUP_DSN set, then stops the server and exits with the
#   command's status, e.g.
#     tests/services/mariadb.sh -- sh -c 'convertor ... --db-type mysql --db-str "$OBD_DEDUP_DSN"'
# The database `conversioncache` is created with scripts/mysql-setup.sh, plus account
# obd / obd-pass (SELECT, INSERT, DELETE only). Needs Debian's mariadb-server.
set -euo pipefail

port=
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=${2:?--port needs a number}; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) echo "mariadb.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

find_bin() {
    local b
    for b in "$(command -v "$1" 2>/dev/null)" "/usr/sbin/$1" "/usr/local/sbin/$1"; do
        [ -n "$b" ] && [ -x "$b" ] && { echo "$b"; return; }
    done
    echo "mariadb.sh: $1 not found (apt-get install mariadb-server)" >&2
    exit 1
}
install_db=$(find_bin mariadb-install-db)
server=$(find_bin mariadbd)
find_bin mariadb >/dev/null

if [ -z "$port" ]; then
    # a random port nobody answers on
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    done
fi
dir=$(mktemp -d /tmp/obd-mariadb-XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

user_opt=()
[ "$(id -u)" = 0 ] && user_opt=(--user=root)
# A private tmpdir: mariadbd deletes every #sql* file in its tmpdir at start-up, which
# breaks any other MariaDB server sharing /tmp.
mkdir -p "$dir/tmp"
common=(--innodb-buffer-pool-size=32M --innodb-log-file-size=8M --skip-name-resolve --tmpdir="$dir/tmp")

"$install_db" --no-defaults --datadir="$dir/data" --auth-root-authentication-method=normal \
    --skip-test-db "${common[@]}" "${user_opt[@]}" >"$dir/install.log" 2>&1 \
    || { cat "$dir/install.log" >&2; exit 1; }
"$server" --no-defaults --datadir="$dir/data" --socket="$dir/sock" --port="$port" \
    --bind-address=127.0.0.1 --log-error="$dir/error.log" --pid-file="$dir/mariadbd.pid" \
    --skip-log-bin "${common[@]}" "${user_opt[@]}" </dev/null >/dev/null 2>&1 &
pid=$!
for _ in $(seq 300); do
    mariadb --no-defaults --socket="$dir/sock" -u root -e 'select 1' >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "mariadb.sh: mariadbd exited:" >&2; tail -20 "$dir/error.log" >&2; exit 1; }
    sleep 0.1
done

here=$(cd "$(dirname "$0")/../.." && pwd)
OBD_DEDUP_DB_PASSWORD=obd-pass "$here/scripts/mysql-setup.sh" --user obd --user-host 127.0.0.1 \
    -- --no-defaults --socket="$dir/sock" -u root >/dev/null
export OBD_DEDUP_DSN="obd:obd-pass@tcp(127.0.0.1:$port)/conversioncache"

if [ $# -gt 0 ]; then
    set +e
    "$@"
    status=$?
    exit $status
fi
echo "MariaDB ready on 127.0.0.1:$port (socket $dir/sock); Ctrl-C stops it and deletes $dir"
echo "  --db-type mysql --db-str '$OBD_DEDUP_DSN'"
echo "  root shell: mariadb --no-defaults --socket=$dir/sock -u root conversioncache"
wait "$pid"
