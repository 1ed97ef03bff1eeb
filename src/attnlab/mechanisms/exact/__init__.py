"""Exact softmax attention and its direct rivals on the shared tiled kernel."""
