"""Data files shipped with attnlab (public-domain texts)."""
