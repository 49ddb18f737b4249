#!/bin/sh
# Runs SeaweedFS for docker-compose.yaml: one S3 identity from S3_ACCESS_KEY / S3_SECRET_KEY,
# written to a file only this user can read (the keys never appear on a command line), and the
# bucket S3_BUCKET created at startup. S3 API on :8333; master, volume and filer stay inside
# the container network (compose publishes only 127.0.0.1:8333).
set -eu
: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY in .env}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY in .env}"
bucket="${S3_BUCKET:-quantpipe-artifacts}"
case "$S3_ACCESS_KEY$S3_SECRET_KEY" in
  *'"'* | *'\'*) echo "S3_ACCESS_KEY / S3_SECRET_KEY must not contain \" or \\" >&2; exit 2 ;;
esac
umask 077
cfg="${TMPDIR:-/tmp}/s3-identities.json"
printf '{"identities": [{"name": "quantpipe", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
  "$S3_ACCESS_KEY" "$S3_SECRET_KEY" > "$cfg"
exec weed mini -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port=8333 \
  -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.config="$cfg" -bucket="$bucket"
