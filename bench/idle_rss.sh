#!/bin/bash
# Launch-to-ready time and idle RSS of the API process and each worker, for one checkout's service.
#   bench/idle_rss.sh CHECKOUT PORT [no-torch]
# crossvit_9_dagger_240, random init, defaults otherwise; the model is prepared first (not timed), so
# the figure is a start with the prepared model on disk. `no-torch` runs the server with torch (timm,
# safetensors, huggingface_hub) unimportable, through a sitecustomize, as tests/service/test_lean.py does.
set -euo pipefail
CHECKOUT=$(realpath "$1"); PORT=$2; PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"  # the venv itself, not its symlink target
SCRATCH=$(mktemp -d); trap 'rm -rf "$SCRATCH"' EXIT
export CROSSVIT_MODEL=crossvit_9_dagger_240 CROSSVIT_WEIGHTS_DIR=$SCRATCH/weights CROSSVIT_ALLOW_RANDOM_WEIGHTS=true \
       CROSSVIT_FETCH_WEIGHTS=false CROSSVIT_PORT=$PORT CROSSVIT_PROBE_PORT=0 CROSSVIT_CACHE_DIR=$SCRATCH/models \
       CROSSVIT_LOG_LEVEL=warning
mkdir -p "$SCRATCH/weights"
cd "$CHECKOUT"
"$PY" -m service.cli --prepare-only >/dev/null 2>&1
EXTRA=""
if [ "${3:-}" = no-torch ]; then
  mkdir -p "$SCRATCH/site"
  cat > "$SCRATCH/site/sitecustomize.py" <<'PY'
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "safetensors", "huggingface_hub"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _NoTorch())
PY
  EXTRA=$SCRATCH/site
fi
PYTHONPATH=$EXTRA "$PY" -m service.cli >"$SCRATCH/server.log" 2>&1 &
PID=$!
START=$(date +%s.%N)
until curl -sf "localhost:$PORT/readyz" >/dev/null; do sleep 0.1; done
echo "ready after $(echo "$(date +%s.%N) - $START" | bc) s"
sleep 3
echo "api $(grep VmRSS /proc/$PID/status)"
for c in $(cat /proc/$PID/task/$PID/children); do
  grep -q spawn_main /proc/$c/cmdline && echo "worker $(grep VmRSS /proc/$c/status)"
done
kill -TERM $PID; wait $PID || true
