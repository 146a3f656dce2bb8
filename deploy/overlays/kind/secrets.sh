#!/usr/bin/env bash
# Writes the kind overlay's Secret sources (random values) unless they exist already.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f sluice.env ] && [ -f runner.env ] && [ -f postgres.env ]; then
  exit 0
fi
random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
api_token=$(random)
runner_secret=$(random)
db_password=$(random)
umask 077
printf 'POSTGRES_USER=sluice\nPOSTGRES_PASSWORD=%s\nPOSTGRES_DB=sluice\n' "$db_password" > postgres.env
printf 'api-token=%s\nrunner-secret=%s\ndatabase-url=postgres://sluice:%s@postgres.sluice.svc:5432/sluice\n' \
  "$api_token" "$runner_secret" "$db_password" > sluice.env
printf 'secret=%s\n' "$runner_secret" > runner.env
echo "wrote the kind Secrets' sources (deploy/overlays/kind/*.env)"
