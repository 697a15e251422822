"""Random Hadamard rotation of 16-element blocks along the last dimension.

y_block = (x_block * d) @ H, with H the 16x16 Sylvester-Hadamard matrix divided by 4 (orthogonal
and symmetric) and d a fixed +-1 sign vector drawn from a seed. Rotation spreads an outlier
over its block so that block scales fit the rest of the block better; `unrotate` undoes it.
"""
from __future__ import annotations

import torch

from lpc.formats.numerics import pad_last, padded

BLOCK = 16


def hadamard(n: int = BLOCK) -> torch.Tensor:
    """(n, n) float32 orthonormal Sylvester-Hadamard matrix (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / (n ** 0.5)


def signs(seed: int) -> torch.Tensor:
    """(16,) float32 +-1 signs; the same seed gives the same vector on every machine."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (BLOCK,), generator=gen).to(torch.float32) * 2 - 1


def rotated_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a rotated tensor: the last dimension padded to a multiple of 16."""
    return (*shape[:-1], padded(shape[-1], BLOCK))


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x: (..., K) float -> float32 (..., Kp16): every block of 16 rotated (zero padding first)."""
    xb = pad_last(x.to(torch.float32), BLOCK)
    kp = xb.shape[-1]
    m = signs(seed).to(x.device).unsqueeze(1) * hadamard().to(x.device)  # diag(d) @ H
    return (xb.reshape(-1, BLOCK) @ m).reshape(*x.shape[:-1], kp)


def unrotate(y: torch.Tensor, seed: int, k: int) -> torch.Tensor:
    """y: (..., Kp16) float32 rotated -> (..., k) float32; inverse of `rotate`."""
    m = signs(seed).to(y.device).unsqueeze(1) * hadamard().to(y.device)
    x = (y.reshape(-1, BLOCK) @ m.T).reshape(y.shape)
    return x[..., :k]


def block_mean(importance: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Importance (K,) or `shape` -> its mean over each block of 16, repeated, (..., Kp16).

    The rotated error e' = e @ M weights the original error by diag(M^T diag(F) M), whose
    entries are the block means of F (every entry of M is +-1/4), so this is exact on the
    diagonal and ignores the off-diagonal terms.
    """
    imp = pad_last(importance.to(torch.float32), BLOCK)
    kp = imp.shape[-1]
    means = imp.reshape(*imp.shape[:-1], kp // BLOCK, BLOCK).sum(-1, keepdim=True) / BLOCK
    return means.expand(*means.shape[:-1], BLOCK).reshape(*imp.shape[:-1], kp)
