"""Constants shared across the library: the bottom of ``l3m_lightning``, importing nothing of it."""

#: The label of a token that is not scored (prompt tokens, padding): PyTorch's ``cross_entropy`` default.
IGNORE_INDEX = -100
