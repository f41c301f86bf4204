# Sourced by scripts/test, bench-store and try-scale-out: an S3-compatible server
# on loopback for what runs against s3:// here (moto from PyPI, pinned, installed
# once into .venv-s3).
#
#   source scripts/s3-server.sh
#   start_s3_server || echo "no S3 server"
#
# start_s3_server sets S3_PID and S3_ENDPOINT (http://127.0.0.1:PORT), after
# checking that the server really refuses a second put-if-absent and a stale
# conditional update (claw's exactly-once protocol rests on both). The caller
# kills S3_PID (e.g. in an EXIT trap).

MOTO_VERSION=5.2.5
S3_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
S3_PID=
S3_ENDPOINT=

start_s3_server() {
  local venv="$S3_ROOT/.venv-s3" port
  if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv" >/dev/null 2>&1 &&
      "$venv/bin/pip" install -q "moto[server]==$MOTO_VERSION" >/dev/null 2>&1 ||
      { rm -rf "$venv"; return 1; }
  fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || return 1
  "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  S3_PID=$!
  for _ in $(seq 100); do
    if "$venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then
      "$venv/bin/python" "$S3_ROOT/scripts/s3_conditional_check.py" "http://127.0.0.1:$port" >&2 || return 1
      S3_ENDPOINT="http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  return 1
}
