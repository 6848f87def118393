#!/usr/bin/env bash
# Plain-proxy throughput and latency: stepgate next to nginx, same backend,
# same load, printed side by side. Loopback only; bounded in time.
#
#   bench/proxy-vs-nginx.sh [SECONDS] [CONNECTIONS]
#
# The backend is nginx answering a fixed 1 KiB body, so the proxy under test
# is the bottleneck. Three runs: nginx as reverse proxy, stepgate on a public
# route (plain proxying), stepgate on a step-up route with a valid primary
# token and second-factor token (JWT checks + store lookup on every request).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/stepgate-target}
cargo build --release --quiet
bin=$CARGO_TARGET_DIR/release/stepgate

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

backend=18091 nginx_proxy=18092 gate=18093 admin=18094
body=$(head -c 1024 /dev/zero | tr '\0' 'x')
cat > "$work/nginx.conf" <<NGINX
worker_processes auto;
daemon off;
error_log $work/nginx-error.log;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$backend; location / { return 200 "$body"; } }
  server {
    listen 127.0.0.1:$nginx_proxy;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)

jwt=$(openssl rand -hex 32) key=$(openssl rand -hex 32)
cat > "$work/gateway.yaml" <<YAML
listen: { address: 127.0.0.1:$gate }
admin: { address: 127.0.0.1:$admin }
upstream: { url: http://127.0.0.1:$backend }
identity:
  jwt: { algorithms: [HS256], secret: "$jwt" }
stepup:
  token: { signing_key: "$key" }
  console: true
routes:
  - name: admin
    path: /admin/**
    stepup: { max_age: 15m }
default: pass
dev: true
log: { level: warn }
YAML
"$bin" run -c "$work/gateway.yaml" 2>"$work/stepgate.log" & pids+=($!)
for port in $backend $nginx_proxy $gate; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

# A primary token and a second-factor token for the step-up run.
primary=$("$bin" token -c "$work/gateway.yaml" --sub bench --email bench@example.com --ttl 1h)
api=http://127.0.0.1:$gate/.stepgate/api
cid=$(curl -sf -H "Authorization: Bearer $primary" -H 'Content-Type: application/json' -d '{"method":"email"}' "$api/otp" | sed 's/.*"challenge_id":"\([^"]*\)".*/\1/')
sleep 0.2
code=$(grep -o 'code for [^:]*: [0-9]*' "$work/stepgate.log" | tail -1 | awk '{print $NF}')
sf=$(curl -sf -H "Authorization: Bearer $primary" -H 'Content-Type: application/json' -d "{\"challenge_id\":\"$cid\",\"code\":\"$code\"}" "$api/otp/verify" | sed 's/.*"token":"\([^"]*\)".*/\1/')

run() { # name url [headers...]
  local name=$1 url=$2; shift 2
  local args=()
  for h in "$@"; do args+=(-H "$h"); done
  wrk -t2 -c"$conns" -d"${secs}s" --latency "${args[@]}" "$url" > "$work/$name.txt"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/$name.txt")
  p50=$(awk '$1=="50%" {print $2}' "$work/$name.txt")
  p99=$(awk '$1=="99%" {print $2}' "$work/$name.txt")
  printf '%-34s %12s %10s %10s\n' "$name" "$rps" "$p50" "$p99"
}
printf '%-34s %12s %10s %10s\n' "proxy (1 KiB, ${conns} conns, ${secs}s)" "req/s" "p50" "p99"
run "nginx reverse proxy" "http://127.0.0.1:$nginx_proxy/plain"
run "stepgate, public route" "http://127.0.0.1:$gate/plain"
run "stepgate, step-up route (JWT+SF)" "http://127.0.0.1:$gate/admin/x" "Authorization: Bearer $primary" "X-Second-Factor-Token: $sf"
