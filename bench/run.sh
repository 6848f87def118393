#!/usr/bin/env bash
# stepgate performance harness: one command, one markdown table.
#
#   bench/run.sh                 # full run (about 25 minutes on 2 cores)
#   QUICK=1 bench/run.sh         # fewer, shorter rounds (about 6 minutes)
#   ONLY='pass|idle' bench/run.sh   # only scenarios whose name matches
#     (names: pass-through, identity, step-up, one_time, fixed-rate, idle,
#     startup, micro)
#
# Installs what is missing (wrk, nginx-light, redis-server, python3 from
# Debian; oha with `cargo install`), builds a release binary, and measures
# on loopback, side by side: the upstream directly (the limit), nginx as a
# reverse proxy (keep-alive upstream, access log off) and stepgate.
#
# Every load scenario runs ROUNDS times, interleaved (a, b, c, a, b, c...),
# and the table shows medians with the spread (min-max) of req/s. Columns:
# req/s, p50/p99 latency (wrk), proxy CPU per request (user+system time of
# the proxy's processes from /proc/PID/stat over the run, divided by the
# requests served: less sensitive to a busy machine than req/s), peak RSS
# of the proxy (VmHWM; summed over nginx's processes).
#
# Knobs (environment): ROUNDS, SECS (per run), CONNS (wrk connections, 50),
# IDLE_CONNS (10000), STEPGATE_BIN (skip the build, use this binary),
# BASE_BIN (also measure another stepgate binary, e.g. a build of main, as
# "stepgate (base)" rows), OUT (also write the table to this file),
# STEPGATE_WORKERS (listen.workers of every gateway measured; unset: the
# default, one serving thread per CPU).
#
# Not part of the test suite; no test asserts a time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-3} SECS=${SECS:-4} IDLE_CONNS=${IDLE_CONNS:-10000}
else
  ROUNDS=${ROUNDS:-5} SECS=${SECS:-10} IDLE_CONNS=${IDLE_CONNS:-10000}
fi
CONNS=${CONNS:-50}
ONLY=${ONLY:-.}

# --- tools --------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
PATH=$PATH:$HOME/.cargo/bin:/usr/sbin
if [[ "fixed-rate" =~ ${ONLY:-.} ]] && ! command -v oha >/dev/null; then
  echo "installing oha (cargo install oha --locked) ..." >&2
  cargo install oha --locked --quiet
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -z "${STEPGATE_BIN:-}" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
  cargo build --release --quiet --bin stepgate
  STEPGATE_BIN=$CARGO_TARGET_DIR/release/stepgate
fi
bin=$STEPGATE_BIN

work=$(mktemp -d /tmp/stepgate-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Keep the raw rows of a run that stopped before its table.
  if [ -n "${OUT:-}" ] && [ ! -s "$OUT" ] && [ -s "$results" ]; then cp "$results" "$OUT.partial.tsv"; fi
  rm -rf "$work"
}
trap cleanup EXIT
results=$work/results.tsv
: > "$results"

port=${BENCH_PORT:-19100}
alloc_port() { port=$((port + 1)); }
wait_port() { # port
  for _ in $(seq 400); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.025; done
  echo "port $1 did not open" >&2; return 1
}

# --- upstream and nginx -------------------------------------------------
alloc_port; backend=$port
alloc_port; nginx_proxy=$port
mkdir -p "$work/www" "$work/nginx-backend" "$work/nginx-proxy"
chmod 755 "$work" "$work/www"   # nginx workers run unprivileged
head -c 100 /dev/zero | tr '\0' 'x' > "$work/www/small"
head -c 16384 /dev/zero | tr '\0' 'y' > "$work/www/big"
cat > "$work/nginx-backend/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
error_log $work/nginx-backend/error.log;
pid $work/nginx-backend/nginx.pid;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$backend backlog=4096;
    root $work/www;
    location ~ /big\$ { default_type text/plain; try_files /big =404; }
    location / { default_type text/plain; try_files /small =404; }
  }
}
NGINX
cat > "$work/nginx-proxy/nginx.conf" <<NGINX
worker_processes auto;
daemon off;
error_log $work/nginx-proxy/error.log;
pid $work/nginx-proxy/nginx.pid;
worker_rlimit_nofile 65536;
events { worker_connections 20000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream backend { server 127.0.0.1:$backend; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_proxy backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
NGINX
nginx -c "$work/nginx-backend/nginx.conf" -p "$work/nginx-backend" & pids+=($!)
backend_pid=$!
nginx -c "$work/nginx-proxy/nginx.conf" -p "$work/nginx-proxy" & pids+=($!)
nginx_pid=$!
wait_port "$backend"; wait_port "$nginx_proxy"

alloc_port; redis_port=$port
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --logfile "$work/redis.log" & pids+=($!)
wait_port "$redis_port"

# --- keys and stepgate configs ------------------------------------------
jwt_secret=$(openssl rand -hex 32)
sf_key=$(openssl rand -hex 32)
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/rsa.pem" 2>/dev/null
openssl pkey -in "$work/rsa.pem" -pubout -out "$work/rsa.pub.pem" 2>/dev/null

# gateway_yaml NAME ALG(HS256|RS256) STORE(memory|redis) LOG(on|off) [EXTRA]
gateway_yaml() {
  local name=$1 alg=$2 store=$3 log=$4 extra=${5:-}
  local gport aport key level store_yaml
  alloc_port; gport=$port; alloc_port; aport=$port
  if [ "$alg" = HS256 ]; then key="secret: \"$jwt_secret\""; else key="public_key: $work/rsa.pub.pem"; fi
  if [ "$log" = on ]; then level=info; else level=warn; fi
  # The memory store keeps a mark per spent one_time token until the token
  # expires (store.max_entries, 100,000 by default, then it fails closed):
  # a one_time run at tens of thousands of requests a second needs room.
  if [ "$store" = redis ]; then store_yaml="store: { redis: \"redis://127.0.0.1:$redis_port\", prefix: \"bench-$name:\" }"; else store_yaml="store: { max_entries: 4000000 }"; fi
  cat > "$work/$name.yaml" <<YAML
listen:
  address: 127.0.0.1:$gport
  header_read_timeout: 120s
  max_connections: 20000${STEPGATE_WORKERS:+
  workers: $STEPGATE_WORKERS}
admin: { address: 127.0.0.1:$aport }
upstream: { url: "http://127.0.0.1:$backend" }
identity:
  jwt: { algorithms: [$alg], $key }
stepup:
  token: { signing_key: "$sf_key", lifetime: 1h }
  console: true
routes:
  - name: admin
    path: /admin/**
    stepup: { max_age: 1h }
  - name: export
    path: /export/**
    stepup: { max_age: 10m, one_time: true }
  - name: account
    path: /account/**
$extra
default: pass
dev: true
log: { level: "$level,stepgate::console=info" }
$store_yaml
YAML
  echo "$gport $aport"
}

# start_gateway NAME BIN -> sets gw_pid, gw_port, gw_admin
start_gateway() {
  local name=$1 b=$2 ports
  read -r gw_port gw_admin < "$work/$name.ports"
  "$b" run -c "$work/$name.yaml" 2>"$work/$name.log" >/dev/null & pids+=($!)
  gw_pid=$!
  wait_port "$gw_port" || { cat "$work/$name.log" >&2; exit 1; }
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$gw_admin/readyz" >/dev/null && break; sleep 0.05
  done
}

# A second-factor token through the real flow (console channel).
sf_token() { # gw_port name primary
  local api=http://127.0.0.1:$1/.stepgate/api cid code
  cid=$(curl -sf -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
    -d '{"method":"email"}' "$api/otp" | sed 's/.*"challenge_id":"\([^"]*\)".*/\1/')
  for _ in $(seq 200); do
    code=$(grep -o 'code for [^:]*: [0-9]*' "$work/$2.log" | tail -1 | awk '{print $NF}' || true)
    [ -n "$code" ] && break; sleep 0.05
  done
  curl -sf -H "Authorization: Bearer $3" -H 'Content-Type: application/json' \
    -d "{\"challenge_id\":\"$cid\",\"code\":\"$code\"}" "$api/otp/verify" \
    | sed 's/.*"token":"\([^"]*\)".*/\1/'
}

# --- measuring ------------------------------------------------------------
cpu_ticks() { # pids... -> utime+stime ticks of each pid and its children
  local total=0 p c
  for p in "$@"; do
    for c in $p $(pgrep -P "$p" 2>/dev/null || true); do
      [ -r "/proc/$c/stat" ] || continue
      total=$((total + $(awk '{print $14 + $15}' "/proc/$c/stat")))
    done
  done
  echo $total
}
peak_rss_kib() { # pids... -> VmHWM summed over pids and children
  local total=0 p c v
  for p in "$@"; do
    for c in $p $(pgrep -P "$p" 2>/dev/null || true); do
      v=$(awk '/VmHWM/ {print $2}' "/proc/$c/status" 2>/dev/null || echo 0)
      total=$((total + ${v:-0}))
    done
  done
  echo $total
}
rss_kib() {
  local total=0 p c v
  for p in "$@"; do
    for c in $p $(pgrep -P "$p" 2>/dev/null || true); do
      v=$(awk '/VmRSS/ {print $2}' "/proc/$c/status" 2>/dev/null || echo 0)
      total=$((total + ${v:-0}))
    done
  done
  echo $total
}
hz=$(getconf CLK_TCK)

# wrk_run SCENARIO TARGET URL PIDS [headers...]; PIDS is a quoted list ("" for none)
wrk_run() {
  local scen=$1 target=$2 url=$3 cpids=$4; shift 4
  local args=() h out t0 t1
  for h in "$@"; do args+=(-H "$h"); done
  out=$work/wrk.txt
  t0=$(cpu_ticks $cpids)
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "${args[@]}" "$url" > "$out"
  t1=$(cpu_ticks $cpids)
  python3 - "$out" "$scen" "$target" "$((t1 - t0))" "$hz" "$(peak_rss_kib $cpids)" "$cpids" >> "$results" <<'PY'
import re, sys
out, scen, target, ticks, hz, rss, cpids = sys.argv[1:]
t = open(out).read()
def lat(p):
    m = re.search(r'^\s+%s%%\s+([\d.]+)(us|ms|s)\b' % p, t, re.M)
    if not m: return float('nan')
    return float(m.group(1)) * {'us': 1e-3, 'ms': 1.0, 's': 1e3}[m.group(2)]
n = int(re.search(r'(\d+) requests in', t).group(1))
bad = re.search(r'Non-2xx or 3xx responses: (\d+)', t)
errs = int(bad.group(1)) if bad else 0
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', t).group(1))
cpu = (int(ticks) * 1e6 / int(hz) / n) if (cpids and n) else float('nan')
print('\t'.join(map(str, [scen, target, rps, lat(50), lat(99), cpu, int(rss) / 1024 if cpids else float('nan'), errs])))
PY
}

row_ok() { # url headers... : one request must answer 200
  local url=$1; shift; local args=() h
  for h in "$@"; do args+=(-H "$h"); done
  [ "$(curl -s -o /dev/null -w '%{http_code}' "${args[@]}" "$url")" = 200 ]
}

want() { [[ "$1" =~ $ONLY ]]; }

# --- the gateways -------------------------------------------------------
bins=("stepgate:$bin")
[ -n "${BASE_BIN:-}" ] && bins+=("stepgate (base):$BASE_BIN")
declare -A GW_PID GW_PORT
for entry in "${bins[@]}"; do
  label=${entry%%:*} b=${entry#*:}
  tag=$(echo "$label" | tr -cd 'a-z')
  for v in "hs-mem-on HS256 memory on" "hs-mem-off HS256 memory off" "rs-mem-off RS256 memory off" \
           "hs-redis-off HS256 redis off" "rs-redis-off RS256 redis off"; do
    set -- $v
    gateway_yaml "$tag-$1" "$2" "$3" "$4" > "$work/$tag-$1.ports"
    # A base build may predate listen.max_connections.
    "$b" check -c "$work/$tag-$1.yaml" >/dev/null 2>&1 || sed -i '/max_connections/d' "$work/$tag-$1.yaml"
    start_gateway "$tag-$1" "$b"
    GW_PID[$tag-$1]=$gw_pid GW_PORT[$tag-$1]=$gw_port
  done
done

primary_hs=$("$bin" token -c "$work/stepgate-hs-mem-on.yaml" --sub bench --email bench@example.com --sid bench1 --ttl 2h)
primary_rs=$("$bin" token -c "$work/stepgate-rs-mem-off.yaml" --sub bench --email bench@example.com --sid bench1 --ttl 2h --key "$work/rsa.pem" --alg RS256)
declare -A SF
# Second-factor tokens through the real flow, minted once per gateway; again
# only if a run outlasts most of the step-up rule's max_age (1h).
mint_sf() {
  local k p
  for k in "${!GW_PORT[@]}"; do
    case $k in *-hs-*) p=$primary_hs ;; *) p=$primary_rs ;; esac
    SF[$k]=$(sf_token "${GW_PORT[$k]}" "$k" "$p")
  done
}
mint_sf
minted=$SECONDS

# --- load scenarios -------------------------------------------------------
scenarios=()
add() { want "$1" && scenarios+=("$1"); return 0; }
add "pass-through 100 B"; add "pass-through 16 KiB"; add "identity HS256"; add "identity RS256"
add "step-up HS256 memory"; add "step-up RS256 memory"; add "step-up HS256 redis"; add "step-up RS256 redis"
add "one_time HS256 memory"; add "one_time HS256 redis"

# One-time tokens: each request spends one, so wrk sends a fresh one each
# time (minted here with the gateway's key, exactly as it issues them).
mint_once() { # count -> file of tokens
  python3 - "$sf_key" "$1" <<'PY'
import base64, hashlib, hmac, json, os, sys, time
key, n = sys.argv[1].encode(), int(sys.argv[2])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b'=').decode()
ses = b64(hashlib.sha256(b'sid:bench1').digest()[:18])
head = b64(json.dumps({"alg": "HS256", "typ": "stepgate-sf+jwt"}).encode())
now = int(time.time())
for i in range(n):
    c = {"iss": "stepgate", "aud": "stepgate:second-factor", "sub": "bench", "ses": ses,
         "amr": ["otp", "email"], "auth_time": now, "iat": now, "exp": now + 900,
         "jti": b64(os.urandom(16))}
    msg = head + "." + b64(json.dumps(c).encode())
    print(msg + "." + b64(hmac.new(key, msg.encode(), hashlib.sha256).digest()))
PY
}
cat > "$work/once.lua" <<'LUA'
local tokens, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
end
request = function()
  i = i + 1
  local t = tokens[i] or "exhausted"
  return wrk.format(nil, nil, { ["X-Second-Factor-Token"] = t, ["Authorization"] = wrk.headers["Authorization"] })
end
LUA

run_once_route() { # scen target key
  local scen=$1 target=$2 k=$3 toks out t0 t1
  toks=$work/once-$k.txt
  mint_once 400000 > "$toks"
  t0=$(cpu_ticks "${GW_PID[$k]}")
  wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$work/once.lua" -H "Authorization: Bearer $primary_hs" \
    "http://127.0.0.1:${GW_PORT[$k]}/export/x" -- "$toks" > "$work/wrk.txt"
  t1=$(cpu_ticks "${GW_PID[$k]}")
  python3 - "$work/wrk.txt" "$scen" "$target" "$((t1 - t0))" "$hz" "$(peak_rss_kib "${GW_PID[$k]}")" "x" >> "$results" <<'PY'
import re, sys
out, scen, target, ticks, hz, rss, _ = sys.argv[1:]
t = open(out).read()
def lat(p):
    m = re.search(r'^\s+%s%%\s+([\d.]+)(us|ms|s)\b' % p, t, re.M)
    return float(m.group(1)) * {'us': 1e-3, 'ms': 1.0, 's': 1e3}[m.group(2)] if m else float('nan')
n = int(re.search(r'(\d+) requests in', t).group(1))
bad = re.search(r'Non-2xx or 3xx responses: (\d+)', t)
rps = float(re.search(r'Requests/sec:\s+([\d.]+)', t).group(1))
print('\t'.join(map(str, [scen, target, rps, lat(50), lat(99), int(ticks) * 1e6 / int(hz) / n, int(rss) / 1024, int(bad.group(1)) if bad else 0])))
PY
}

one_round() {
  local scen entry label tag path k p sf
  for scen in "${scenarios[@]}"; do
    case $scen in
      "pass-through 100 B"|"pass-through 16 KiB")
        [ "$scen" = "pass-through 100 B" ] && path=/small || path=/big
        wrk_run "$scen" "upstream direct" "http://127.0.0.1:$backend$path" ""
        wrk_run "$scen" "nginx" "http://127.0.0.1:$nginx_proxy$path" "$nginx_pid"
        for entry in "${bins[@]}"; do
          label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
          wrk_run "$scen" "$label, access log on" "http://127.0.0.1:${GW_PORT[$tag-hs-mem-on]}$path" "${GW_PID[$tag-hs-mem-on]}"
          wrk_run "$scen" "$label, access log off" "http://127.0.0.1:${GW_PORT[$tag-hs-mem-off]}$path" "${GW_PID[$tag-hs-mem-off]}"
        done ;;
      "identity HS256"|"identity RS256")
        for entry in "${bins[@]}"; do
          label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
          if [ "$scen" = "identity HS256" ]; then k=$tag-hs-mem-off p=$primary_hs; else k=$tag-rs-mem-off p=$primary_rs; fi
          wrk_run "$scen" "$label" "http://127.0.0.1:${GW_PORT[$k]}/account/x" "${GW_PID[$k]}" "Authorization: Bearer $p"
        done ;;
      step-up*)
        for entry in "${bins[@]}"; do
          label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
          case $scen in
            *HS256*memory) k=$tag-hs-mem-off ;; *RS256*memory) k=$tag-rs-mem-off ;;
            *HS256*redis) k=$tag-hs-redis-off ;; *RS256*redis) k=$tag-rs-redis-off ;;
          esac
          case $k in *-hs-*) p=$primary_hs ;; *) p=$primary_rs ;; esac
          wrk_run "$scen" "$label" "http://127.0.0.1:${GW_PORT[$k]}/admin/x" "${GW_PID[$k]}" \
            "Authorization: Bearer $p" "X-Second-Factor-Token: ${SF[$k]}"
        done ;;
      one_time*)
        for entry in "${bins[@]}"; do
          label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
          case $scen in *memory) k=$tag-hs-mem-off ;; *) k=$tag-hs-redis-off ;; esac
          run_once_route "$scen" "$label" "$k"
        done ;;
    esac
  done
}

# Sanity: every gateway answers the routes it is measured on.
for k in "${!GW_PORT[@]}"; do
  case $k in *-hs-*) p=$primary_hs ;; *) p=$primary_rs ;; esac
  row_ok "http://127.0.0.1:${GW_PORT[$k]}/admin/x" "Authorization: Bearer $p" "X-Second-Factor-Token: ${SF[$k]}" \
    || { echo "gateway $k does not serve the step-up route; see $work/$k.log" >&2; cat "$work/$k.log" >&2; exit 1; }
done

if [ ${#scenarios[@]} -gt 0 ]; then
  for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS ..." >&2
    # Mint again only when the tokens near max_age (1h): every mint is a
    # code sent, and the send caps (per user and per client) count them (a
    # 10m max_age and a mint every 5 minutes ran into them on long runs).
    if [ $((SECONDS - minted)) -gt 3000 ]; then mint_sf; minted=$SECONDS; fi
    one_round
  done
fi

# --- fixed rate: p99 at 5000 req/s (open loop) --------------------------
if want "fixed-rate"; then
  for r in $(seq "$ROUNDS"); do
    for t in "nginx:$nginx_proxy:$nginx_pid" $(for entry in "${bins[@]}"; do label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z'); echo "$tag:${GW_PORT[$tag-hs-mem-on]}:${GW_PID[$tag-hs-mem-on]}"; done); do
      IFS=: read -r name tport tpid <<< "$t"
      case $name in nginx) label=nginx ;; stepgate) label="stepgate, access log on" ;; *) label="stepgate (base), access log on" ;; esac
      t0=$(cpu_ticks "$tpid")
      oha -z "${SECS}s" -q 5000 -c "$CONNS" --no-tui --output-format json "http://127.0.0.1:$tport/small" > "$work/oha.json" 2>/dev/null \
        || oha -z "${SECS}s" -q 5000 -c "$CONNS" --no-tui -j "http://127.0.0.1:$tport/small" > "$work/oha.json"
      t1=$(cpu_ticks "$tpid")
      python3 - "$work/oha.json" "$label" "$((t1 - t0))" "$hz" "$(peak_rss_kib "$tpid")" >> "$results" <<'PY'
import json, sys
f, label, ticks, hz, rss = sys.argv[1:]
d = json.load(open(f))
s = d["summary"]; p = d["latencyPercentiles"]
n = sum(d.get("statusCodeDistribution", {}).values()) or 1
ok = d.get("statusCodeDistribution", {}).get("200", 0)
print('\t'.join(map(str, ["fixed rate 5000 req/s, 100 B", label, s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000,
      int(ticks) * 1e6 / int(hz) / n, int(rss) / 1024, n - ok])))
PY
    done
  done
fi

# --- 10,000 idle keep-alive connections ---------------------------------
# The client's program is a file: its stdin is the coprocess pipe, whose EOF
# tells it to close the connections (a heredoc would be its stdin instead,
# and it would close them at once).
cat > "$work/idle.py" <<'PY'
import asyncio, sys, resource
port, count, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def one(conns):
    for attempt in range(50):
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.05)
    else:
        return
    if mode == "request":
        w.write(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        await r.readexactly(100)
    conns.append((r, w))
async def main():
    conns, sem = [], asyncio.Semaphore(500)
    async def bounded():
        async with sem:
            await one(conns)
    await asyncio.gather(*(bounded() for _ in range(count)))
    print(len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY
idle_client() { # port count mode(request|connect) -> prints the connections open, waits for stdin EOF
  python3 "$work/idle.py" "$@"
}
if want "idle"; then
  # A fresh gateway per binary and per measurement, started now: the
  # gateways above hold what the load scenarios left (the one_time runs'
  # spent-token marks, tens of MiB), and one that had already held 10,000
  # connections keeps its allocator's pages of them, neither of which is
  # what idle connections cost. nginx keeps nothing between requests; its
  # proxy is the one measured above.
  declare -A IDLE_GW
  for mode in connect request; do
    for entry in "${bins[@]}"; do
      label=${entry%%:*} b=${entry#*:}; tag=$(echo "$label" | tr -cd 'a-z')
      gateway_yaml "$tag-idle-$mode" HS256 memory off > "$work/$tag-idle-$mode.ports"
      "$b" check -c "$work/$tag-idle-$mode.yaml" >/dev/null 2>&1 || sed -i '/max_connections/d' "$work/$tag-idle-$mode.yaml"
      start_gateway "$tag-idle-$mode" "$b"
      IDLE_GW[$tag]="$gw_port:$gw_pid"
    done
    targets=("nginx:$nginx_proxy:$nginx_pid")
    for entry in "${bins[@]}"; do
      label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
      targets+=("$label:${IDLE_GW[$tag]}")
    done
    for t in "${targets[@]}"; do
      IFS=: read -r label tport tpid <<< "$t"
      before=$(rss_kib "$tpid")
      coproc IDLE { idle_client "$tport" "$IDLE_CONNS" "$mode"; }
      read -r opened <&"${IDLE[0]}"
      # Idle, not the tail of the burst: stepgate parks a connection 250
      # ms after its exchange and its allocator returns freed pages 100 ms
      # later; RSS measured 1 s after the last answer still held part of
      # the burst (68 -> 56 MiB within the next second, steady after).
      sleep 3
      after=$(rss_kib "$tpid")
      exec {IDLE[1]}>&-
      wait "$IDLE_PID" 2>/dev/null || true
      what="$IDLE_CONNS idle connections, after one request each"
      [ "$mode" = connect ] && what="$IDLE_CONNS idle connections, nothing sent"
      printf '%s\t%s\t%s\t%s\t%s\n' "$what" "$label" "$opened" "$((after / 1024))" "$(((after - before) * 1024 / ${opened:-1}))" >> "$work/idle.tsv"
      sleep 1
    done
    for entry in "${bins[@]}"; do
      label=${entry%%:*}; tag=$(echo "$label" | tr -cd 'a-z')
      kill "${IDLE_GW[$tag]#*:}" 2>/dev/null || true
    done
  done
fi

# --- start-up to ready with a 200-rule policy ---------------------------
if want "startup"; then
  gateway_yaml startup HS256 memory off "$(for i in $(seq 200); do
    case $((i % 4)) in
      0) echo "  - { name: r$i, path: /app$i/**, stepup: { max_age: 5m } }" ;;
      1) echo "  - { name: r$i, path: /svc$i/items/*, methods: [GET, POST] }" ;;
      2) echo "  - { name: r$i, path_regex: '/api/v[0-9]+/thing$i(/.*)?', stepup: { max_age: 1m, one_time: true } }" ;;
      3) echo "  - { name: r$i, path: /static$i/**, public: true }" ;;
    esac
  done)" > "$work/startup.ports"
  read -r sport saport < "$work/startup.ports"
  for r in $(seq "$ROUNDS"); do
    python3 - "$bin" "$work/startup.yaml" "$saport" >> "$work/startup.tsv" <<'PY'
import subprocess, sys, time, socket
b, cfg, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.monotonic()
p = subprocess.Popen([b, "run", "-c", cfg], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
try:
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                break
        except OSError:
            pass
        time.sleep(0.0005)
    print("%.1f" % ((time.monotonic() - t0) * 1000))
finally:
    p.terminate(); p.wait()
PY
  done
fi

# --- criterion micro-benchmarks (benches/hot_path.rs) -------------------
# 200-rule normalise + match, primary token verification (cache hit and
# miss), the second-factor check: medians from criterion's estimates.
if want "micro"; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
  cargo bench --quiet --bench hot_path -- --noplot >&2
  python3 - "$CARGO_TARGET_DIR/criterion" > "$work/micro.md" <<'PY'
import json, os, sys
root = sys.argv[1]
rows = []
for dirpath, _, files in os.walk(root):
    if dirpath.endswith(os.sep + "new") and "estimates.json" in files and "benchmark.json" in files:
        b = json.load(open(os.path.join(dirpath, "benchmark.json")))
        e = json.load(open(os.path.join(dirpath, "estimates.json")))
        rows.append((b.get("full_id") or b.get("title"), e["median"]["point_estimate"]))
if rows:
    print("\n| micro-benchmark (criterion) | median |")
    print("|---|---|")
    for name, ns in sorted(rows):
        print(f"| {name} | {ns / 1000:,.2f} µs |" if ns >= 1000 else f"| {name} | {ns:,.0f} ns |")
PY
fi

# --- the table ------------------------------------------------------------
python3 - "$results" "$work/idle.tsv" "$work/startup.tsv" "$ROUNDS" "$SECS" "$CONNS" > "$work/table.md" <<'PY'
import sys, statistics as st, math, os, platform
res, idle, startup, rounds, secs, conns = sys.argv[1:]
rows = {}
order = []
for line in open(res):
    scen, target, rps, p50, p99, cpu, rss, errs = line.rstrip("\n").split("\t")
    key = (scen, target)
    if key not in rows:
        rows[key] = []; order.append(key)
    rows[key].append(tuple(float(x) for x in (rps, p50, p99, cpu, rss, errs)))
def med(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return st.median(xs) if xs else float('nan')
def f(x, nd=0):
    return "–" if math.isnan(x) else f"{x:,.{nd}f}"
print(f"{rounds} interleaved rounds of {secs} s each, wrk -t1 -c{conns}; medians, req/s spread min–max. "
      f"{os.cpu_count()} cores, {platform.machine()}, the load generator and upstream on the same machine.\n")
print("| scenario | target | req/s (spread) | × nginx | p50 ms | p99 ms | proxy CPU µs/req | peak RSS MiB | non-2xx |")
print("|---|---|---|---|---|---|---|---|---|")
nginx = {}
for (scen, target) in order:
    if target == "nginx":
        nginx[scen] = med([r[0] for r in rows[(scen, target)]])
for (scen, target) in order:
    rs = rows[(scen, target)]
    rps = [r[0] for r in rs]
    ratio = ""
    if scen in nginx and target not in ("nginx", "upstream direct"):
        ratio = f"{med(rps) / nginx[scen]:.2f}×"
    print(f"| {scen} | {target} | {f(med(rps))} ({f(min(rps))}–{f(max(rps))}) | {ratio} | {f(med([r[1] for r in rs]), 2)} | "
          f"{f(med([r[2] for r in rs]), 2)} | {f(med([r[3] for r in rs]), 1)} | {f(med([r[4] for r in rs]), 1)} | {int(sum(r[5] for r in rs))} |")
if os.path.exists(idle) and os.path.getsize(idle):
    print("\n| idle connections | target | open | RSS MiB | bytes per connection |")
    print("|---|---|---|---|---|")
    for line in open(idle):
        what, target, opened, rss, per = line.rstrip("\n").split("\t")
        print(f"| {what} | {target} | {opened} | {rss} | {int(per):,} |")
if os.path.exists(startup) and os.path.getsize(startup):
    xs = [float(x) for x in open(startup).read().split()]
    print(f"\nStart-up to ready (`/readyz` 200) with a 200-rule policy: median {st.median(xs):.1f} ms "
          f"(spread {min(xs):.1f}–{max(xs):.1f} ms, {len(xs)} runs).")
PY
[ -s "$work/micro.md" ] && cat "$work/micro.md" >> "$work/table.md"
cat "$work/table.md"
[ -n "${OUT:-}" ] && cp "$work/table.md" "$OUT"
exit 0
