"""The worker process: its entry point (main.py), the backends it runs (backends/), and the protocol it
shares with the parent (protocol.py: typed messages and shared-memory slots), the one module both sides
import."""
