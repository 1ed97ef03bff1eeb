"""The one error type that attnlab raises for input it cannot accept."""


class AttnInputError(ValueError):
    """Bad input to an attention call.

    The message always names the argument, what was expected and what came,
    for example ``"k: expected 4 dimensions [B, Hkv, Nk, D], got shape (2, 8, 16)"``.
    """
