#!/bin/bash
# What survives a SIGTERM to LitServe's main process (bench/litserve_server.py, as serve_load.py runs it).
#   bench/litserve_sigterm.sh        (loopback port 8402; kills whatever is left at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
weights=$(mktemp --suffix .safetensors)
.venv/bin/python -c "
import sys, torch; from safetensors.torch import save_file; from model import create_model
torch.manual_seed(0); save_file(create_model('crossvit_9_dagger_240').state_dict(), sys.argv[1])" "$weights"
setsid .venv/bin/python bench/litserve_server.py --weights "$weights" --port 8402 >/dev/null 2>&1 &
main=$!
for _ in $(seq 120); do curl -s -o /dev/null 127.0.0.1:8402/health && break; sleep 1; done
echo "processes in the server's session before SIGTERM: $(ps -o pid= -s "$main" | wc -l)"
kill -TERM "$main"
for wait_s in 10 20; do
  sleep 10
  echo "main process alive ${wait_s} s after SIGTERM: $(kill -0 "$main" 2>/dev/null && echo yes || echo no)"
  ps -o pid,pcpu,etime,args -s "$main" | cut -c1-110
done
pkill -KILL -s "$main" || true
rm -f "$weights"
