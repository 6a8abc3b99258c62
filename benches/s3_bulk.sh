#!/usr/bin/env bash
# 1 GiB into a real S3-compatible server (a Garage node on loopback) through
# recvault, against a raw multipart PUT of the same bytes by the same client,
# in one run (issue #7 point 2; figures in BENCHMARKS.md).
#
#   bash benches/s3_bulk.sh [size, default 1GiB] [rounds, default 3]
#
# Needs `garage` on PATH or in ~/.cargo/bin (.ci/run installs it) and a
# recvault binary: RECVAULT_BIN, default target/release/recvault.
# SIGN_PAYLOAD=false runs both sides with unsigned payloads, the default
# over https (Garage here speaks plain http, where the default signs).
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-1GiB}"
rounds="${2:-3}"
bin="${RECVAULT_BIN:-target/release/recvault}"
garage="$(command -v garage || echo "$HOME/.cargo/bin/garage")"
work="$(mktemp -d)"
trap 'kill "${gpid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
s3_port="$(port)"; rpc_port="$(port)"
cat > "$work/garage.toml" <<TOML
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
TOML
g() { RUST_LOG=error "$garage" -c "$work/garage.toml" "$@"; }
RUST_LOG=warn "$garage" -c "$work/garage.toml" server 2>"$work/garage.log" >/dev/null &
gpid=$!
for _ in $(seq 300); do g status >/dev/null 2>&1 && break; sleep 0.2; done
node="$(g node id -q | cut -d@ -f1)"
g layout assign -z dc1 -c 1G "$node" >/dev/null
g layout apply --version 1 >/dev/null
key="$(g json-api CreateKey '{"name":"bench"}')"
python3 -c 'import json,sys; k=json.loads(sys.argv[1]); print(k["accessKeyId"]); print(k["secretAccessKey"])' "$key" \
  | { read -r id; read -r secret; umask 077; echo "$id" > "$work/key-id"; echo "$secret" > "$work/secret"; }
g bucket create bench >/dev/null
g bucket allow --read --write --owner bench --key "$(cat "$work/key-id")" >/dev/null
cat > "$work/recvault.toml" <<TOML
[storage]
backend = "s3"
endpoint = "http://127.0.0.1:$s3_port"
bucket = "bench"
region = "garage"
path_style = true
allow_http = true
access_key_id_file = "$work/key-id"
secret_access_key_file = "$work/secret"
write_once = "check-first"
${SIGN_PAYLOAD:+sign_payload = $SIGN_PAYLOAD}
TOML
# The S3 API may answer 503 for a moment after the layout is applied.
sleep 2
"$bin" loadgen bulk --server-bin "$bin" --server-config "$work/recvault.toml" --work-dir "$work/runs" \
  --size "$size" --rounds "$rounds"
