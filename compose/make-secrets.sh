#!/usr/bin/env bash
# Makes the site's secrets in ./secrets (readable by root only), on the control machine: the
# site CA and a certificate per principal (make-certs.sh). There are no passwords: every client
# of the broker proves who it is with its certificate.
# Usage: ./make-secrets.sh gw1 gw2 gw3   (the gateways' names; default gw1 gw2 gw3).
# Copy node-<gateway>.pem, node-<gateway>.key and ca.pem (never ca.key) to each gateway's
# compose/secrets/ afterwards.
set -euo pipefail
cd "$(dirname "$0")"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(gw1 gw2 gw3)
./make-certs.sh "${nodes[@]}"
# The broker reads its key as its own user (uid 1883 in the eclipse-mosquitto image).
chown 1883:1883 secrets/broker.key 2>/dev/null || true
