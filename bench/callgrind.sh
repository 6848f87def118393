#!/usr/bin/env bash
# Instructions per request under callgrind: stable on a busy machine where
# CPU time is not (blind to the kernel, and SHA-256 runs in software under
# valgrind, without the CPU's SHA extensions).
#
#   bench/callgrind.sh [STEPGATE_BIN]    # default: builds a release binary
#
# One stepgate process under `valgrind --tool=callgrind` per scenario, nginx
# upstream answering 100 B: 200 warm-up requests, counters zeroed
# (`callgrind_control -z`), N (2000) requests over 4 keep-alive connections
# from a Python http.client loop, counters dumped; prints the dumped Ir / N.
# Scenarios (ONLY to choose): pass-on (access log on), pass-off (log off),
# rs-mem (step-up route, RS256 primary + second-factor token, memory store,
# log off). Needs valgrind, nginx, python3, openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
PATH=$PATH:/usr/sbin
if [ -n "${1:-}" ]; then
  bin=$1
else
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(pwd)/target}
  cargo build --release --quiet --bin stepgate
  bin=$CARGO_TARGET_DIR/release/stepgate
fi
w=$(mktemp -d /tmp/stepgate-callgrind.XXXXXX)
chmod 755 "$w"   # nginx workers run unprivileged
trap 'kill "$(cat "$w/nginx.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$w"' EXIT
mkdir -p "$w/www"; chmod 755 "$w/www"
head -c 100 /dev/zero | tr '\0' x > "$w/www/small"
port=${CALLGRIND_PORT:-19390}
cat > "$w/nginx.conf" <<NG
worker_processes 1; daemon on; error_log $w/nginx-error.log; pid $w/nginx.pid;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; root $w/www;
    location / { default_type text/plain; try_files /small =404; } } }
NG
nginx -c "$w/nginx.conf" -p "$w"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$w/rsa.pem" 2>/dev/null
openssl pkey -in "$w/rsa.pem" -pubout -out "$w/rsa.pub.pem"
sf_key=$(openssl rand -hex 32)

cat > "$w/client.py" <<'PY'
import http.client, sys
port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hdrs = dict(h.split(": ", 1) for h in sys.argv[4:])
cs = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(4)]
bad = 0
for i in range(n):
    c = cs[i % 4]
    c.request("GET", path, headers=hdrs)
    r = c.getresponse()
    if r.status != 200 or len(r.read()) != 100:
        bad += 1
sys.exit(1 if bad else 0)
PY

gateway_yaml() { # name port alg level
  local key
  if [ "$3" = HS256 ]; then key="secret: \"$(openssl rand -hex 32)\""; else key="public_key: $w/rsa.pub.pem"; fi
  cat > "$w/$1.yaml" <<Y
listen: { address: 127.0.0.1:$2, header_read_timeout: 120s }
admin: { address: 127.0.0.1:$(($2 + 1)) }
upstream: { url: "http://127.0.0.1:$port" }
identity:
  jwt: { algorithms: [$3], $key }
stepup:
  token: { signing_key: "$sf_key" }
  console: true
routes:
  - { name: admin, path: /admin/**, stepup: { max_age: 10m } }
default: pass
dev: true
log: { level: "$4" }
Y
}

measure() { # name port path headers...
  local name=$1 gport=$2 path=$3 vpid ir
  shift 3
  valgrind --tool=callgrind --callgrind-out-file="$w/cg.$name.%p" "$bin" run -c "$w/$name.yaml" \
    2>"$w/$name.log" >/dev/null &
  vpid=$!
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/"$gport") 2>/dev/null && break; sleep 0.1; done
  python3 "$w/client.py" "$gport" 200 "$path" "$@" || { echo "$name: warm-up requests failed" >&2; exit 1; }
  callgrind_control -z "$vpid" >/dev/null 2>&1
  python3 "$w/client.py" "$gport" "$N" "$path" "$@" || { echo "$name: requests failed" >&2; exit 1; }
  callgrind_control -d "$vpid" >/dev/null 2>&1
  kill -INT "$vpid"; wait "$vpid" || true
  ir=$(awk '/^summary:/ {print $2}' "$w/cg.$name.$vpid.1")
  printf '%s\t%s Ir/req\n' "$name" "$((ir / N))"
}

gateway_yaml pass-on $((port + 10)) HS256 info
gateway_yaml pass-off $((port + 12)) HS256 warn
gateway_yaml rs-mem $((port + 14)) RS256 warn
primary=$("$bin" token -c "$w/rs-mem.yaml" --sub bench --email bench@example.com --sid bench1 \
  --ttl 2h --key "$w/rsa.pem" --alg RS256)
# A second-factor token as the gateway issues them (bench/run.sh's mint_once).
sf=$(python3 - "$sf_key" <<'PY'
import base64, hashlib, hmac, json, os, sys, time
key = sys.argv[1].encode()
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b'=').decode()
ses = b64(hashlib.sha256(b'sid:bench1').digest()[:18])
head = b64(json.dumps({"alg": "HS256", "typ": "stepgate-sf+jwt"}).encode())
now = int(time.time())
c = {"iss": "stepgate", "aud": "stepgate:second-factor", "sub": "bench", "ses": ses,
     "amr": ["otp", "email"], "auth_time": now, "iat": now, "exp": now + 900, "jti": b64(os.urandom(16))}
msg = head + "." + b64(json.dumps(c).encode())
print(msg + "." + b64(hmac.new(key, msg.encode(), hashlib.sha256).digest()))
PY
)
for s in ${ONLY:-pass-on pass-off rs-mem}; do
  case $s in
    pass-on) measure pass-on $((port + 10)) /small ;;
    pass-off) measure pass-off $((port + 12)) /small ;;
    rs-mem) measure rs-mem $((port + 14)) /admin/x "Authorization: Bearer $primary" "X-Second-Factor-Token: $sf" ;;
  esac
done
