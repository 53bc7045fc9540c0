"""The parent's side of inference: the engine (admission, deadlines, results: engine.py), the dynamic
batcher (batcher.py), the worker pool and its supervision (pool.py, watchdog.py), where workers go and
with which backend (placement.py, assembly.py), the weights at start-up (loading.py), and branch
agreement (agreement.py); items.py is what travels between them (a queued image, its output). It
talks to worker processes only through service/worker/protocol.py."""
