"""Text relevance of visual tokens: content words of the question, embedded by the LLM.

``r_i = max_j cos(v_i, t_j)`` over the LLM input embeddings ``t_j`` of the question's
content words (max over words beat mean and pooled in the paper's ablation; the words come
from `resprune.words`). This module knows nothing about images or models beyond an
embedding table.
"""

from __future__ import annotations

import torch

from resprune.words import extract_content_words

__all__ = ["extract_content_words", "token_relevance"]


def token_relevance(tokens: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """``r_i = max_j cos(v_i, t_j)`` for tokens [N, D] and text [T, D]; ones when no text."""
    if text is None or text.numel() == 0:
        return torch.ones(tokens.shape[0], dtype=torch.float32, device=tokens.device)
    v = torch.nn.functional.normalize(tokens.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float().to(tokens.device), dim=-1)
    return (v @ t.T).max(dim=-1).values
