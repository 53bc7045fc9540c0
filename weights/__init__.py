"""Checkpoints the service loads, the ImageNet-1k labels, and the tooling to fetch and verify them."""
