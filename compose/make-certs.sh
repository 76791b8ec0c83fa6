#!/usr/bin/env bash
# Makes the site's CA and the certificates of its principals in ./secrets with openssl, the
# layout and profile that fogmig's own CA uses (platform/security/pki.py):
#   ca.pem, ca.key              the site CA (ECDSA P-256); ca.key never leaves this machine
#   node-<gw>.pem, node-<gw>.key  a gateway's certificate (URI SAN fogmig:node:<gw>, common
#                               name <gw>) and key: the agent's identity on the broker (MQTT
#                               over TLS) and on the migration channel (mutual TLS 1.3)
#   controller.pem/.key         the controller (fogmig:controller, common name controller)
#   operator.pem/.key           the command line (fogmig:operator, common name operator)
#   device-<d>.pem/.key         each device named in $DEVICES (fogmig:device:<d>, common name
#                               <d>); list its service under "devices" in site/state.json
#   broker.pem/.key             the broker (fogmig:broker), with its address $BROKER_IP (default
#                               192.168.50.2, the one in site/state.json) as an IP SAN
# Usage: DEVICES="d0 d1" ./make-certs.sh gw1 gw2 gw3 (the gateways' names; default gw1 gw2
# gw3; devices: none). An existing CA and existing certificates are kept; delete them to issue
# new ones.
set -euo pipefail
cd "$(dirname "$0")"
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(gw1 gw2 gw3)
umask 077
mkdir -p secrets
chmod 0700 secrets
cd secrets

read -r -a devices <<< "${DEVICES:-}"
for n in "${nodes[@]}" "${devices[@]}"; do
    if ! [[ "$n" =~ ^[a-z][a-z0-9]{0,9}$ ]]; then
        echo "invalid name '$n': 1-10 lowercase letters and digits, starting with a letter" >&2
        exit 1
    fi
done
for d in "${devices[@]}"; do
    for n in "${nodes[@]}"; do
        if [ "$d" = "$n" ]; then
            echo "device '$d' has a gateway's name: the broker knows both by name" >&2
            exit 1
        fi
    done
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

issue() {  # stem common-name uri [ip]
    [ -s "$1.pem" ] && return 0
    new_key "$1.key"
    ext=$(mktemp)
    san="URI:$3"
    [ -z "${4:-}" ] || san="$san, IP:$4"
    cat > "$ext" <<CONF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = critical, $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CONF
    openssl req -new -key "$1.key" -subj "/CN=$2" |
        openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -sha256 \
            -extfile "$ext" -out "$1.pem" 2>/dev/null
    rm -f "$ext"
    chmod 0644 "$1.pem"
}

for n in "${nodes[@]}"; do issue "node-$n" "$n" "fogmig:node:$n"; done
issue controller controller fogmig:controller
issue operator operator fogmig:operator
for d in "${devices[@]}"; do issue "device-$d" "$d" "fogmig:device:$d"; done
issue broker broker fogmig:broker "${BROKER_IP:-192.168.50.2}"
rm -f ca.srl
echo "site CA and certificates for ${nodes[*]}, controller, operator, ${devices[*]:-no device} and broker in $PWD"
