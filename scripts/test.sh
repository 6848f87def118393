#!/usr/bin/env bash
# Run every stepgate test on a Debian machine with Rust installed.
# Installs what the tests need (real redis-server, a real SMTP server,
# openssl for test certificates, headless Chromium for the browser tests,
# Node.js and the pinned npm package oidc-provider for a real OpenID
# provider) when it is missing, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need+=(python3-aiosmtpd)
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
# Forward-auth tests run through a real nginx (auth_request) and Caddy.
command -v nginx >/dev/null || need+=(nginx-light)
command -v caddy >/dev/null || need+=(caddy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The identity tests' OpenID provider, exactly as locked (oidc-provider 8.8.1).
oidc=tests/support/oidc
if [ "$oidc/package-lock.json" -nt "$oidc/node_modules/.package-lock.json" ]; then
  npm ci --prefix "$oidc" --no-audit --no-fund --loglevel=error
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
else
  cargo test --all-targets --no-fail-fast "$@"
fi
