#!/usr/bin/env bash
# A real Prefect server on 127.0.0.1:4200, the process work pool, prefect.yaml's deployments and a
# worker, for scheduled and UI-triggered flywheel runs. Stop with Ctrl-C (stops the worker and server).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
mkdir -p .worldloop
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.worldloop/prefect-server}"
.venv/bin/prefect server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}" > .worldloop/prefect-server.log 2>&1 &
server=$!
trap 'kill $server ${worker:-} 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -fs "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fs "$PREFECT_API_URL/health" >/dev/null || { echo "Prefect server did not start; see .worldloop/prefect-server.log"; exit 1; }
make deploy
echo "UI: http://127.0.0.1:${PREFECT_PORT:-4200}   trigger: .venv/bin/prefect deployment run flywheel/nightly"
.venv/bin/prefect worker start --pool worldloop-process &
worker=$!
wait $worker
