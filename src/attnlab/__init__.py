"""attnlab: the laboratory of the attention literature.

    >>> import torch, attnlab
    >>> q = k = v = torch.randn(1, 8, 128, 64)
    >>> out = attnlab.attention(q, k, v, mechanism="softmax", causal=True)

Every mechanism follows the tensor contract of
``torch.nn.functional.scaled_dot_product_attention``; see ``attnlab list``.
"""

from attnlab import mechanisms
from attnlab.core import (
    AttnInputError,
    Mechanism,
    Spec,
    attention,
    get,
    register,
    spec,
)
from attnlab.models.registration import register_with_transformers
from attnlab.models.swap import use

__version__ = "0.1.0"

# "attnlab:<name>" becomes a valid attn_implementation as soon as transformers' modeling
# module is loaded, without importing transformers here (see attnlab.models.registration)
register_with_transformers()

__all__ = [
    "AttnInputError",
    "Mechanism",
    "Spec",
    "__version__",
    "attention",
    "get",
    "mechanisms",
    "register",
    "spec",
    "use",
]
