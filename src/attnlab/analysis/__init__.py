"""Per-head measurements of attention, reduced in a streaming way from captured blocks.

Streaming analyses (fed by :func:`attnlab.models.capture` or :func:`analyse_maps`):
:class:`Sinks`, :class:`Entropy`, :class:`AttentionDistance`, :class:`FutureInfluence`,
:class:`TokenPatterns`, :class:`RetrievalScore`, :class:`Rollout`, :class:`Flow`.
Experiments that run a model themselves: :func:`needle_trials` (retrieval heads) and
:func:`head_importance` (masking each head).
"""

from .base import Analysis, CaptureInfo
from .distance import AttentionDistance, FutureInfluence
from .entropy import Entropy
from .flow import Flow, Rollout, attention_flow, max_flow, rollout
from .importance import head_importance
from .needle import Needle, make_needle, shipped_text
from .offline import analyse_maps
from .patterns import TokenPatterns, repeated_random_tokens
from .retrieval import RetrievalScore, needle_trials, random_heads, retrieval_heads
from .sinks import Sinks

# the analyses `attnlab analyze --analyses` can name, each built with its defaults
STREAMING: dict[str, type[Analysis]] = {
    cls.name: cls
    for cls in (Sinks, Entropy, AttentionDistance, FutureInfluence, TokenPatterns, Rollout, Flow)
}

__all__ = [
    "STREAMING",
    "Analysis",
    "AttentionDistance",
    "CaptureInfo",
    "Entropy",
    "Flow",
    "FutureInfluence",
    "Needle",
    "RetrievalScore",
    "Rollout",
    "Sinks",
    "TokenPatterns",
    "analyse_maps",
    "attention_flow",
    "head_importance",
    "make_needle",
    "max_flow",
    "needle_trials",
    "random_heads",
    "repeated_random_tokens",
    "retrieval_heads",
    "rollout",
    "shipped_text",
]
