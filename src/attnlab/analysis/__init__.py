"""Per-head measurements of attention, reduced in a streaming way from captured blocks.

Streaming analyses (fed by :func:`attnlab.models.capture` or :func:`analyze_maps`):
:class:`Sinks`, :class:`Entropy`, :class:`AttentionDistance`, :class:`FutureInfluence`,
:class:`TokenPatterns`, :class:`RetrievalScore`, :class:`Rollout`, :class:`Flow`.
Experiments that run a model themselves: :func:`needle_trials` (retrieval heads) and
:class:`HeadImportance` / :func:`head_importance` (masking each head).

Each analysis that ``attnlab analyze`` can name registers itself with
:func:`register_analysis`; :func:`registry` returns ``{name: class}`` in the order
below, :func:`default_analyses` the default set.
"""

# registry() lists the analyses in the order their modules are imported here
# isort: off
from .base import Analysis, CaptureInfo, default_analyses, register_analysis, registry
from .sinks import Sinks
from .entropy import Entropy
from .distance import AttentionDistance, FutureInfluence
from .patterns import TokenPatterns, repeated_random_tokens
from .retrieval import RetrievalScore, needle_trials, random_heads, retrieval_heads
from .importance import HeadImportance, head_importance
from .flow import Flow, Rollout, attention_flow, attention_graph, rollout
from .needle import Needle, make_needle, shipped_text
from .offline import analyze_maps

# isort: on

__all__ = [
    "Analysis",
    "AttentionDistance",
    "CaptureInfo",
    "Entropy",
    "Flow",
    "FutureInfluence",
    "HeadImportance",
    "Needle",
    "RetrievalScore",
    "Rollout",
    "Sinks",
    "TokenPatterns",
    "analyze_maps",
    "attention_flow",
    "attention_graph",
    "default_analyses",
    "head_importance",
    "make_needle",
    "needle_trials",
    "random_heads",
    "register_analysis",
    "registry",
    "repeated_random_tokens",
    "retrieval_heads",
    "rollout",
    "shipped_text",
]
