"""Linear attention with the elu+1 feature map (Katharopoulos et al., arXiv:2006.16236).

Compared with idiap/fast-transformers (LinearAttention and CausalLinearAttention,
elu_feature_map): attnlab agrees, phi = elu + 1 on the raw queries and keys, the causal
form through cumulative sums; the authors add eps = 1e-6 to the denominator, where
attnlab divides by the sum itself (kept off zero only by the smallest normal float, so a
row that sees nothing gives 0), and they zero padded keys by multiplying the features,
where attnlab masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnlab.core import Spec, register

from ._featuremap import FeatureMapAttention


@register
class Linear(FeatureMapAttention):
    """Linear attention of "Transformers are RNNs" (Katharopoulos et al., arXiv:2006.16236).

    out_i = phi(q_i)ᵀ sum_j phi(k_j) v_jᵀ / phi(q_i)ᵀ sum_j phi(k_j) with
    phi(x) = elu(x) + 1, over all keys or, causal, over j <= i; the causal
    sum is the RNN state S_i = S_{i-1} + phi(k_i) v_iᵀ, z_i = z_{i-1} + phi(k_i).
    The feature map takes q and k as they are: ``scale`` does not enter (the
    paper's similarity has none). A different model from softmax, so its
    reference is its own dense definition.
    """

    spec = Spec(
        name="linear",
        family="linear",
        title="Linear attention, elu+1 feature map (Transformers are RNNs)",
        paper="arXiv:2006.16236",
        exact=False,
        decode=True,
        complexity="O(N·D²)",
    )
    native_feature = "elu1"

    @dataclass
    class Config:
        form: str = "chunked"
        chunk: int | None = None

    def features(self, x, scale, *, query):
        """elu(x) + 1; without autograd as min(exp(x), 1) + max(x, 0), in place (the same
        function: on CPU torch's elu kernel is several times slower than exp)."""
        if x.requires_grad:
            return F.elu(x) + 1.0
        return torch.exp(x).clamp_max_(1.0).add_(x.clamp_min(0.0))
