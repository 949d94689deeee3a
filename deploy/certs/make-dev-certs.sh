#!/bin/sh
# Development certificates for the docker-compose stack, made with openssl:
#   ca.crt, ca.key    a development CA (the agent trusts ca.crt: api.tls.ca_file)
#   tls.crt, tls.key  Envoy's server certificate, signed by that CA, for the names envoy and
#                     localhost and the address 127.0.0.1 (envoy/envoy.yaml reads both)
# Usage: deploy/certs/make-dev-certs.sh [DIR]   (DIR defaults to this script's folder)
# Existing files are left alone: delete them to make new ones. Never use these in production.
set -eu
dir=${1:-$(dirname "$0")}
mkdir -p "$dir"
cd "$dir"
if [ -e ca.crt ] || [ -e tls.crt ]; then
    echo "make-dev-certs: $(pwd) already has certificates; delete them to make new ones" >&2
    exit 1
fi
umask 077
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -days 3650 -subj "/CN=WellTegra development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.crt
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=envoy" -keyout tls.key -out tls.csr
cat > tls.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:envoy,DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile tls.ext -out tls.crt
rm -f tls.csr tls.ext ca.srl
# Certificates are public; the keys stay readable by their owner only (Envoy runs as
# ENVOY_UID, set to that owner in docker-compose.yml).
chmod 644 ca.crt tls.crt
chmod 600 ca.key tls.key
echo "make-dev-certs: wrote ca.crt, ca.key, tls.crt, tls.key in $(pwd)"
