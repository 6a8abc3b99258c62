#!/bin/sh
# One-shot set-up of the compose Garage node: a layout holding everything,
# the bucket `recvault`, and the key recvault uses, imported from the
# secret files. Each step is skipped when already done, so it can re-run.
set -eu
g() { garage -c /etc/garage.toml "$@"; }

tries=0
until g status >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    echo "garage-init: garage does not answer on its RPC port" >&2
    exit 1
  fi
  sleep 1
done

node=$(g node id -q | cut -d@ -f1)
if g status | grep -q "NO ROLE ASSIGNED"; then
  g layout assign -z dc1 -c 1G "$node"
  g layout apply --version 1
fi

key_id=$(cat /run/secrets/s3_access_key_id)
if ! g key info "$key_id" >/dev/null 2>&1; then
  g key import --yes -n recvault "$key_id" "$(cat /run/secrets/s3_secret_access_key)"
fi
if ! g bucket info recvault >/dev/null 2>&1; then
  g bucket create recvault
fi
g bucket allow --read --write --owner recvault --key "$key_id"
echo "garage-init: bucket recvault ready for key $key_id"
