#!/usr/bin/env bash
# Makes the site's secrets in ./secrets (readable by root only), on the control machine:
#   <user>.password   an MQTT password per gateway, for the device host "dev" and "controller"
#   passwd            the broker's password file (hashed, by mosquitto_passwd)
#   transfer.secret   the gateways' shared migration-channel secret (hex)
#   credentials.json  the controller's MQTT password, in the embedded testbed's format
# Usage: ./make-secrets.sh gw1 gw2 gw3   (the gateways' names; default gw1 gw2 gw3).
# Copy <gateway>.password and transfer.secret to each gateway's compose/secrets/ afterwards.
set -euo pipefail
cd "$(dirname "$0")"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(gw1 gw2 gw3)
users=("${nodes[@]}" dev controller)
umask 077
mkdir -p secrets

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

[ -s secrets/transfer.secret ] || random_hex 32 > secrets/transfer.secret
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

printf '{"mqtt": {"controller": "%s"}, "transfer_secret_hex": "%s"}\n' \
    "$(cat secrets/controller.password)" "$(cat secrets/transfer.secret)" > secrets/credentials.json
echo "secrets for ${users[*]} in $PWD/secrets"
