#!/usr/bin/env bash
# Secrets for a llamarpc cluster, into DIR (default deploy/secrets):
#   token              the nodes' shared secret (--auth-token-file on nodes, --rpc-token-file on the frontend)
#   api-keys           one HTTP API key for the frontend (--api-key-file)
#   ca.pem             a private CA (the frontend's --rpc-tls-ca; clients of the HTTPS port trust it too)
#   NAME.pem NAME-key.pem   a certificate per name, signed by the CA, valid for NAME, localhost and
#                      127.0.0.1 plus any addresses in $EXTRA_SAN (e.g. EXTRA_SAN="DNS:box1.lan,IP:10.0.0.5")
# Names default to node1 node2 frontend (compose.yaml's services). A node's name must be the host
# the frontend dials in --rpc (gRPC checks it against the certificate). Existing files are kept:
# run it again with new names to add certificates signed by the same CA.
#   deploy/make-certs.sh [DIR] [NAME...]
set -euo pipefail
dir=${1:-"$(dirname "${BASH_SOURCE[0]}")/secrets"}
shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(node1 node2 frontend)
days=${DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is needed" >&2; exit 1; }
mkdir -p "$dir"
umask 077
cd "$dir"
[ -s token ] || { openssl rand -hex 32 > token; echo "made $dir/token"; }
[ -s api-keys ] || { echo "sk-$(openssl rand -hex 24)" > api-keys; echo "made $dir/api-keys"; }
if [ ! -s ca.pem ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" -subj "/CN=llamarpc cluster CA" \
        -keyout ca-key.pem -out ca.pem 2>/dev/null
    echo "made $dir/ca.pem"
fi
for name in "${names[@]}"; do
    [ -s "$name.pem" ] && continue
    san="DNS:$name,DNS:localhost,IP:127.0.0.1${EXTRA_SAN:+,$EXTRA_SAN}"
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=$name" -keyout "$name-key.pem" -out "$name.csr" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" -sha256 \
        -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
    echo "made $dir/$name.pem ($san)"
done
# readable by the containers' user (uid of `llamarpc` in the image) through the bind mount
chmod 644 ./*.pem token api-keys
chmod 600 ca-key.pem
