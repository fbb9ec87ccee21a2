"""The names of the combination operators and TIES sign methods, without torch.

:mod:`lora_merge.compute.combine` implements them; the option checks and the
command line's ``--help`` only need their names, and must not import torch for them.
"""

from typing import Literal

Operator = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SignMethod = Literal["total", "frequency"]
# The form adapters are combined in (see lora_merge.adapter.recipe).
Form = Literal["cat", "factors", "svd", "full"]
