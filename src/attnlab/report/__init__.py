"""Plots, tables and self-contained HTML pages built from attnlab's results."""
