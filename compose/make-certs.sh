#!/usr/bin/env bash
# Makes the site's CA and one certificate per gateway in ./secrets with openssl, the layout and
# profile that fogmig's own CA uses (platform/security/pki.py):
#   ca.pem, ca.key              the site CA (ECDSA P-256); ca.key never leaves this machine
#   node-<gw>.pem, node-<gw>.key  the gateway's certificate (URI SAN fogmig:node:<gw>, common
#                               name <gw>) and key: the agents authenticate each other with
#                               them on the migration channel (mutual TLS 1.3)
# Usage: ./make-certs.sh gw1 gw2 gw3 (the gateways' names; default gw1 gw2 gw3). An existing CA
# and existing certificates are kept; delete them to issue new ones.
set -euo pipefail
cd "$(dirname "$0")"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(gw1 gw2 gw3)
umask 077
mkdir -p secrets
chmod 0700 secrets
cd secrets

for n in "${nodes[@]}"; do
    if ! [[ "$n" =~ ^[a-z][a-z0-9]{0,9}$ ]]; then
        echo "invalid gateway name '$n': 1-10 lowercase letters and digits, starting with a letter" >&2
        exit 1
    fi
done

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if ! [ -s ca.pem ]; then
    new_key ca.key
    openssl req -new -x509 -key ca.key -out ca.pem -days 3650 -sha256 -subj "/CN=fogmig site CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
    chmod 0644 ca.pem
fi

for n in "${nodes[@]}"; do
    [ -s "node-$n.pem" ] && continue
    new_key "node-$n.key"
    ext=$(mktemp)
    cat > "$ext" <<CONF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = critical, URI:fogmig:node:$n
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CONF
    openssl req -new -key "node-$n.key" -subj "/CN=$n" |
        openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -sha256 \
            -extfile "$ext" -out "node-$n.pem" 2>/dev/null
    rm -f "$ext"
    chmod 0644 "node-$n.pem"
done
rm -f ca.srl
echo "site CA and certificates for ${nodes[*]} in $PWD"
