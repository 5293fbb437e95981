"""Inputs shared by the model tests (not a test module)."""

import torch


def padded_batch(vocab: int, seed: int = 0, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of ids in [3, vocab): row 0 right-padded, row 1 left-padded, row 2 unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 6:] = 0
    mask[1, :4] = 0
    return ids, mask
