"""Per-head measurements of attention, reduced in a streaming way from captured blocks."""

from .base import Analysis, CaptureInfo

__all__ = ["Analysis", "CaptureInfo"]
