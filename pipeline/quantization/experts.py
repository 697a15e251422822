"""Statistics for MoE experts that calibration never routed a token to.

Such an expert's inputs were never seen: its X^T X is zero, its absmax zero and its Fisher zero, and
every consumer would degenerate on them (importance-weighted scale search choosing among all-zero
errors, sensitivity clipping with zero weights, GPTQ with an empty Hessian). lpc stands in the pooled
statistics of its siblings: the same matrix (gate_up_proj or down_proj) of the other experts of the
same block, token-weighted (X^T X / n over all their tokens, the max of their absmax, the mean of their
Fisher). The router sends every expert of a block the same hidden states, so the pooled inputs are
the best estimate of what the idle expert would see. When no sibling saw a token either, the
statistics are weight-only: identity X^T X (every input channel weighted equally), absmax 1 and
uniform Fisher 1. The token count stays 0 (the artifact records the truth) and the names of the
layers given stand-ins are returned for the manifest.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch

log = logging.getLogger(__name__)

_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<index>\d+)\.(?P<matrix>[^.]+)$")


def expert_siblings(names: list[str]) -> dict[str, list[str]]:
    """{expert Linear name: the same matrix of the other experts of its block} for names like
    `model.layers.0.mlp.experts.3.down_proj`; other names are left out."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m:
            groups.setdefault((m["block"], m["matrix"]), []).append(name)
    return {n: [s for s in group if s != n] for group in groups.values() for n in group}


def stand_in_statistics(stats: dict[str, Any]) -> list[str]:
    """Fill, in place, the statistics of experts that saw no token (InputStats with count 0, finished).

    stats: layer -> InputStats (calibration/stats.py) with `cov` (in, in), `absmax` (in,), `count`, and
    optional `extra` tensors (weight_fisher (out, in), act_fisher (in,)). Returns the names filled."""
    filled = []
    siblings = expert_siblings(list(stats))
    for name, others in siblings.items():
        s = stats[name]
        if s.count > 0:
            continue
        seen = [stats[o] for o in others if stats[o].count > 0]
        total = sum(o.count for o in seen)
        if seen:
            s.cov = sum(o.covariance().double() * o.count for o in seen).div(total).float()
            s.absmax = torch.stack([o.absmax for o in seen]).amax(0)
            for key, t in s.extra.items():
                s.extra[key] = torch.stack([o.extra[key].float() for o in seen if key in o.extra]).mean(0)
        else:
            s.cov = torch.eye(s.in_features) if s.full else torch.ones(s.in_features)
            s.absmax = torch.ones(s.in_features)
            for key, t in s.extra.items():
                s.extra[key] = torch.ones_like(t, dtype=torch.float32)
        s.xtx = None
        filled.append(name)
    if filled:
        log.info("%d expert layer(s) received no calibration token; their statistics are their siblings' "
                 "pooled ones (or weight-only): %s", len(filled), ", ".join(filled[:4]))
    return filled
