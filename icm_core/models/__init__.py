"""Base models: loading, content identity for cache keys, and the torchvision import shim."""
