"""Sparse attention: fixed masks and routing, on the shared block-sparse engine (core.blocks)."""
