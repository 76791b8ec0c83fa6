#!/usr/bin/env bash
# Makes the site's secrets in ./secrets (readable by root only), on the control machine:
#   <user>.password   an MQTT password per gateway, for the device host "dev" and "controller"
#   passwd            the broker's password file (hashed, by mosquitto_passwd)
#   credentials.json  the controller's MQTT password, in the embedded testbed's format
#   ca.pem, ca.key, node-<gateway>.pem/.key  the site CA and the gateways' certificates for
#                     the migration channel (mutual TLS), made by make-certs.sh
# Usage: ./make-secrets.sh gw1 gw2 gw3   (the gateways' names; default gw1 gw2 gw3).
# Copy <gateway>.password, node-<gateway>.pem, node-<gateway>.key and ca.pem (never ca.key) to
# each gateway's compose/secrets/ afterwards.
set -euo pipefail
cd "$(dirname "$0")"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(gw1 gw2 gw3)
users=("${nodes[@]}" dev controller)
umask 077
mkdir -p secrets

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

for u in "${users[@]}"; do
    [ -s "secrets/$u.password" ] || random_hex 18 > "secrets/$u.password"
done

hash_password() {  # user password-file
    if command -v mosquitto_passwd >/dev/null 2>&1; then
        mosquitto_passwd -b secrets/passwd "$1" "$(cat "$2")"
    else
        docker run --rm -v "$PWD/secrets:/s" eclipse-mosquitto:2 \
            mosquitto_passwd -b /s/passwd "$1" "$(cat "$2")"
    fi
}
: > secrets/passwd
for u in "${users[@]}"; do hash_password "$u" "secrets/$u.password"; done
# The broker reads it as its own user (uid 1883 in the eclipse-mosquitto image).
chown 1883:1883 secrets/passwd 2>/dev/null || chmod 0644 secrets/passwd

printf '{"mqtt": {"controller": "%s"}}\n' "$(cat secrets/controller.password)" \
    > secrets/credentials.json
./make-certs.sh "${nodes[@]}"
echo "secrets for ${users[*]} in $PWD/secrets"
