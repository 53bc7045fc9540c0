"""crossvit-serve: the HTTP service around the CrossViT model."""
