#!/bin/sh
# Makes the random secrets deploy/compose.yaml mounts, once, under
# deploy/compose/secrets/ (git-ignored). recvault refuses secret files that
# group or others can read, and runs as uid 10001 in its image: the files
# are mode 0600 and, when run as root, owned by 10001 (otherwise run
# `sudo chown 10001:10001 deploy/compose/secrets/*` afterwards; postgres
# and garage read theirs as root).
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
new() { [ -e "secrets/$1" ] || { printf '%s' "$2" >"secrets/$1"; echo "made secrets/$1"; }; }

new pg_password "$(hex 24)"
new catalog_url "host=postgres user=recvault dbname=recvault password=$(cat secrets/pg_password)"
# Garage key ids are GK + 24 hex digits; secrets 64 hex digits.
new s3_access_key_id "GK$(hex 12)"
new s3_secret_access_key "$(hex 32)"
new garage_rpc_secret "$(hex 32)"
# recvault's root key file, v1 layout (docs/KEYS.md): magic, 16-byte id, 32-byte key.
if [ ! -e secrets/root.key ]; then
  { printf 'RVROOTK1'; head -c 48 /dev/urandom; } >secrets/root.key
  echo "made secrets/root.key"
fi
chmod 600 secrets/*
if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 secrets/catalog_url secrets/s3_access_key_id secrets/s3_secret_access_key secrets/root.key
else
  echo "now: sudo chown 10001:10001 $(pwd)/secrets/catalog_url $(pwd)/secrets/s3_* $(pwd)/secrets/root.key"
fi
