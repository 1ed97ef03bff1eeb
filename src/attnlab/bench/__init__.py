"""Benchmarks: speed and memory scaling, approximation quality, real-model runs; JSON records."""
