#!/usr/bin/env bash
# Start two local docker-registry instances for manual convertor use:
#   plain HTTP           127.0.0.1:${PLAIN_PORT:-5000}   (convertor --plain)
#   TLS + htpasswd       127.0.0.1:${TLS_PORT:-5443}     user "test", password "test"
#                                                         (convertor --root-ca DIR/ca.crt -u test:test)
# Storage, certificates and logs go to DIR (default /tmp/obd-registry).
# Tests do not use this script; they start their own registries.
#
# usage: tests/services/registry.sh start|stop|status [DIR]
set -euo pipefail
CMD=${1:-start}
DIR=${2:-/tmp/obd-registry}
PLAIN_PORT=${PLAIN_PORT:-5000}
TLS_PORT=${TLS_PORT:-5443}
BIN=/usr/bin/docker-registry

need() { command -v "$1" >/dev/null || { echo "missing $1 (apt-get install $2)" >&2; exit 1; }; }

pki() {
  [ -f "$DIR/server.crt" ] && return
  need openssl openssl
  ( cd "$DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 \
      -subj /CN=obd-test-ca 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
      -days 365 -extfile server.ext 2>/dev/null )
}

config() { # name port extra
  cat > "$DIR/$1.yml" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $DIR/$1-data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$2
$3
YML
}

start() {
  [ -x "$BIN" ] || { echo "missing $BIN (apt-get install docker-registry)" >&2; exit 1; }
  need htpasswd apache2-utils
  mkdir -p "$DIR"
  pki
  htpasswd -Bbn test test > "$DIR/htpasswd" 2>/dev/null
  config plain "$PLAIN_PORT" ""
  config tls "$TLS_PORT" "  tls:
    certificate: $DIR/server.crt
    key: $DIR/server.key
auth:
  htpasswd:
    realm: obd-test
    path: $DIR/htpasswd"
  for n in plain tls; do
    if [ -f "$DIR/$n.pid" ] && kill -0 "$(cat "$DIR/$n.pid")" 2>/dev/null; then
      echo "$n registry already running (pid $(cat "$DIR/$n.pid"))"; continue
    fi
    nohup "$BIN" serve "$DIR/$n.yml" >"$DIR/$n.log" 2>&1 &
    echo $! > "$DIR/$n.pid"
  done
  sleep 0.5
  status
  echo "examples:"
  echo "  skopeo copy --dest-tls-verify=false oci:IMG:latest docker://127.0.0.1:$PLAIN_PORT/demo:latest"
  echo "  convertor -r 127.0.0.1:$PLAIN_PORT/demo -i latest -o latest_obd --plain"
  echo "  convertor -r 127.0.0.1:$TLS_PORT/demo -i latest -o latest_obd -u test:test --root-ca $DIR/ca.crt"
}

stop() {
  for n in plain tls; do
    if [ -f "$DIR/$n.pid" ]; then
      kill "$(cat "$DIR/$n.pid")" 2>/dev/null || true
      rm -f "$DIR/$n.pid"
      echo "stopped $n registry"
    fi
  done
}

status() {
  for n in plain tls; do
    if [ -f "$DIR/$n.pid" ] && kill -0 "$(cat "$DIR/$n.pid")" 2>/dev/null; then
      echo "$n registry: running, pid $(cat "$DIR/$n.pid"), log $DIR/$n.log"
    else
      echo "$n registry: not running"
    fi
  done
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
