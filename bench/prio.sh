#!/bin/bash
# Run a benchmark at the highest CPU priority, children included:
#   sudo bench/prio.sh .venv/bin/python bench/serve_load.py
# With sched_autogroup on (Debian's default), `nice` only orders processes within one session's
# autogroup; against other sessions (other shells, test runs) only the autogroup's own nice counts.
# So: a new session, its autogroup set to -20 (needs root). Servers the benchmark starts stay in
# this session (serve_load.py gives them a process group, not a session).
exec setsid bash -c 'echo -20 > /proc/self/autogroup; exec "$@"' _ "$@"
