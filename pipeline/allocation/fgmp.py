"""FGMP precision policy (arXiv 2504.14152): which blocks of 16 stay FP8, which go NVFP4.

Weights: every block b of every target Linear gets the score
I_b = sum_{i in b} F_i [(w_i - Q_lo(w_i))^2 - (w_i - Q_hi(w_i))^2] (`lpc.formats.fgmp.block_scores`
with the weight Fisher as F); the round(p * total) highest-scoring blocks of the whole model are
kept high. Activations: the same score with the per-channel activation Fisher; a threshold fixed
offline on calibration activations sends fraction p of blocks high, and at run time each block is
compared with it on the fly.

Baselines at the same fraction: `random_high_blocks` (seeded) and `magnitude_high_blocks`
(largest block L2 norm or amax). All policies return {layer name: bool (R, nb)}, True = FP8, in the
layout of the `fgmp` format's mask (R rows of the weight, nb = ceil(K / 16) blocks per row).
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lpc.formats import get_format, stored_bits
from lpc.formats.fgmp import block_scores
from lpc.pipeline.errors import InputError, RecipeError
from lpc.pipeline.calibration.fisher import input_device
from lpc.pipeline.modes import eval_mode
from lpc.pipeline.progress import Progress, track

logger = logging.getLogger(__name__)

BLOCK = get_format("fgmp").block_width()  # weights per mask entry along the input dimension


def _count_high(fraction: float, total: int) -> int:
    """round(fraction * total), halves rounded up (not Python's banker's rounding)."""
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise RecipeError(f"high-precision fraction must be in [0, 1], got {fraction!r}",
                          "set e.g. fraction: 0.1 for 10% of blocks in FP8")
    return min(total, int(math.floor(fraction * total + 0.5)))


def select_high_blocks(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Keep the round(fraction * total_blocks) highest-scoring blocks of all layers together.

    scores: layer name -> float (R, nb) block scores; the dict order is the layer order.
    Ties at the cut are broken by (layer order, row-major block index): earlier blocks win.
    Returns layer name -> bool (R, nb) on CPU, True = high precision; exactly the rounded count.
    """
    flat = _flat_scores(scores)
    k = _count_high(fraction, flat.numel())
    if k == 0 or k == flat.numel():
        return {name: torch.full(tuple(s.shape), k > 0, dtype=torch.bool) for name, s in scores.items()}
    # The k-th largest score v: everything above v is in, then the first (k - #above) equal to v.
    cut = flat.kthvalue(flat.numel() - k + 1).values
    need = k - int((flat > cut).sum())
    masks, taken = {}, 0
    for name, s in scores.items():
        s = s.detach().to("cpu", torch.float32)
        eq = s.reshape(-1) == cut
        rank = torch.cumsum(eq, 0) + taken  # 1-based rank of each tie in model order
        masks[name] = ((s.reshape(-1) > cut) | (eq & (rank <= need))).view(s.shape)
        taken += int(eq.sum())
    return masks


def _flat_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.ndim != 2 or not s.is_floating_point():
            raise InputError(f"block scores of '{name}' must be a float (R, nb) tensor, got "
                             f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}",
                             "compute them with lpc.formats.fgmp.block_scores")
        if not torch.isfinite(s).all():
            raise InputError(f"block scores of '{name}' hold NaN or inf",
                             "check the Fisher statistics and weights of that layer")
    if not scores:
        return torch.zeros(0)
    return torch.cat([s.detach().to("cpu", torch.float32).reshape(-1) for s in scores.values()])


def random_high_blocks(shapes: dict[str, tuple[int, int]], fraction: float,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Baseline: round(fraction * total) blocks drawn uniformly without replacement, model-wide.

    shapes: layer name -> (R, nb) mask shape. Same seed and shapes -> same masks.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(tuple(shape), generator=gen) for name, shape in shapes.items()}
    return select_high_blocks(scores, fraction)


def magnitude_high_blocks(weights: dict[str, torch.Tensor], fraction: float,
                          norm: Literal["l2", "amax"] = "l2") -> dict[str, torch.Tensor]:
    """Baseline: keep the blocks of largest magnitude (L2 norm or amax over the block of 16).

    weights: layer name -> (R, K) float; K is zero-padded to a multiple of 16 as the formats do.
    """
    return select_high_blocks({name: magnitude_scores(w, norm) for name, w in weights.items()}, fraction)


def magnitude_scores(w: torch.Tensor, norm: Literal["l2", "amax"] = "l2") -> torch.Tensor:
    """(R, K) weight -> (R, ceil(K/16)) block magnitudes (L2 norm or amax of each block of 16)."""
    if norm not in ("l2", "amax"):
        raise RecipeError(f"unknown magnitude norm {norm!r}", "use norm='l2' or norm='amax'")
    blocks = _blocks(w.detach().to(torch.float32))
    return blocks.square().sum(-1).sqrt() if norm == "l2" else blocks.abs().amax(-1)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(R, K) -> (R, ceil(K/BLOCK), BLOCK), zero-padded (BLOCK = the fgmp block width, 16)."""
    k = x.shape[-1]
    return F.pad(x, (0, -k % BLOCK)).view(x.shape[0], -1, BLOCK)


def weight_block_scores(weights: dict[str, torch.Tensor], fishers: dict[str, torch.Tensor],
                        global_amax: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """FGMP weight scores: layer -> float32 (R, nb) = block_scores(W, importance=weight Fisher).

    weights: (R, K) float; fishers: (R, K) (or (K,)) non-negative; global_amax: amax behind a
    layer's shared NVFP4 scale when it is fused with others (default: the weight's own).
    """
    missing = [n for n in weights if n not in fishers]
    if missing:
        raise InputError(f"no Fisher statistics for layers {missing[:5]}",
                         "run `lpc calibrate --fisher` with the same target layers")
    amax = global_amax or {}
    return {name: block_scores(w.detach(), fishers[name], amax.get(name)) for name, w in weights.items()}


def activation_threshold(score_samples: torch.Tensor | list[torch.Tensor], fraction: float) -> float:
    """Threshold t with "block goes high iff score > t" sending fraction p of samples high.

    Quantile rule: n samples, k = round(p * n) (halves up), sorted descending s_1 >= ... >= s_n.
    0 < k < n: t = s_{k+1}, the largest score that stays low, so exactly k samples are above t
    unless s_k == s_{k+1}, in which case the tied samples all stay low (fewer than k go high).
    k = 0: t = s_1 (nothing is strictly above). k = n: t = the float32 just below s_n (all above).
    score_samples: a tensor of any shape, or a list of them (one per layer: they are copied once into
    one array, partitioned in place, so the selection costs one copy of the samples and no indices);
    returns a Python float exactly representable in float32.
    """
    import numpy as np

    parts = score_samples if isinstance(score_samples, (list, tuple)) else [score_samples]
    flat = np.concatenate([p.detach().reshape(-1).to("cpu", torch.float32).numpy() for p in parts]) \
        if parts else np.zeros(0, dtype=np.float32)
    if flat.size == 0:
        raise InputError("activation_threshold got no score samples",
                         "collect activation block scores on calibration data first")
    if not np.isfinite(flat).all():
        raise InputError("activation block scores hold NaN or inf",
                         "check the activation Fisher and calibration activations")
    n = flat.size
    k = _count_high(fraction, n)
    if k == n:
        return float(torch.nextafter(torch.tensor(flat.min()), torch.tensor(-math.inf)))
    flat.partition(n - k - 1)  # the (n - k)-th smallest in its place, as kthvalue(n - k) gives it
    return float(flat[n - k - 1])


def collect_activation_scores(model: nn.Module, batches: Iterable[torch.Tensor],
                              targets: dict[str, nn.Linear], act_fisher: dict[str, torch.Tensor],
                              act_amax: dict[str, float] | None = None,
                              max_blocks_per_layer: int | None = None, seed: int = 0,
                              progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Activation block scores of each target Linear's input on calibration batches.

    batches: LongTensor (B, T) token ids. act_fisher: layer -> (in,) per-channel activation Fisher.
    act_amax: layer -> calibrated activation amax behind the NVFP4 tensor scale (default: the
    amax of each batch's own activation). max_blocks_per_layer: keep a uniform random subset of at
    most this many scores per layer (bottom-k of seeded random keys: memory stays bounded and the
    subset is the same for the same seed and batches).
    Returns layer -> float32 (n,) scores on CPU. The model is run in eval mode under no_grad and
    its modes are restored.
    """
    pools = _pools(targets, act_fisher, max_blocks_per_layer, seed)
    with eval_mode(model), _forward_hooks(targets, _score_hook(pools, act_fisher, act_amax)):
        for batch in track(batches, "activation scores", progress):
            model(input_ids=batch.reshape(-1, batch.shape[-1]).to(input_device(model)), use_cache=False)
    return {name: pool.result() for name, pool in pools.items()}


def collect_activation_scores_layerwise(model: nn.Module, found: tuple[str, nn.ModuleList], store: Any,
                                        batches: list[torch.Tensor], targets: dict[str, nn.Linear],
                                        act_fisher: dict[str, torch.Tensor], act_amax: dict[str, float] | None = None,
                                        max_blocks_per_layer: int | None = None, seed: int = 0,
                                        progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """`collect_activation_scores` one decoder layer at a time on a meta skeleton (`found` =
    decoder_layers(model), everything outside the stack loaded, weights read from `store`): the same
    scores (each pool sees its Linear's inputs in the same batch order), with one layer resident and each
    finished pool reduced to its sample before the next layer."""
    from lpc.pipeline.calibration.stats import advance_layer, capture_layer_inputs
    from lpc.pipeline.io.streaming import materialize, release

    pools = _pools(targets, act_fisher, max_blocks_per_layer, seed)
    hook = _score_hook(pools, act_fisher, act_amax)
    path, layers = found
    out: dict[str, torch.Tensor] = {}
    with eval_mode(model), torch.no_grad():
        states = capture_layer_inputs(model, layers, [b.reshape(-1, b.shape[-1]) for b in batches], "cpu")
        for i, layer in track(list(enumerate(layers)), "activation scores (layer by layer)", progress):
            mine = {n: m for n, m in targets.items() if n.startswith(f"{path}.{i}.")}
            materialize(layer, f"{path}.{i}", store)
            try:
                with _forward_hooks(mine, hook):
                    for j in range(len(states)):
                        advance_layer(layer, states, j)
            finally:
                release(layer)
            out.update({n: pools.pop(n).result() for n in mine})
    return {n: out[n] for n in targets}


def _pools(targets: dict[str, nn.Linear], act_fisher: dict[str, torch.Tensor], cap: int | None, seed: int
           ) -> dict[str, "_Pool"]:
    missing = [n for n in targets if n not in act_fisher]
    if missing:
        raise InputError(f"no activation Fisher for layers {missing[:5]}",
                         "run `lpc calibrate --fisher` with the same target layers")
    return {name: _Pool(cap, seed + i) for i, name in enumerate(targets)}


def _score_hook(pools: dict[str, "_Pool"], act_fisher: dict[str, torch.Tensor], act_amax: dict[str, float] | None
                ) -> Callable[[str], Callable]:
    amax = act_amax or {}

    def hook(name: str) -> Callable:
        def on_forward(_m: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0].detach()
            scores = block_scores(x.reshape(-1, x.shape[-1]), act_fisher[name], amax.get(name))
            pools[name].add(scores.reshape(-1).cpu())
        return on_forward

    return hook


class _Pool:
    """All scores, or a uniform subset of at most `cap`: each score draws a random key and the
    `cap` smallest keys are kept (streaming sampling without replacement). Once `cap` are held, a
    score whose key exceeds the largest kept key can never be kept and is dropped on arrival, so a
    pool holds at most about 2 x cap scores (210 pools of 200,000 on SmolLM2 held up to 4 x cap,
    1.3 GB, before this filter)."""

    def __init__(self, cap: int | None, seed: int):
        if cap is not None and cap < 1:
            raise RecipeError(f"max_blocks_per_layer must be >= 1, got {cap}", "use e.g. 1_000_000 or None")
        self.cap, self.gen = cap, torch.Generator().manual_seed(seed)
        self.values: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self._held = 0
        self._bound: torch.Tensor | None = None  # the largest kept key once `cap` are kept

    def add(self, scores: torch.Tensor) -> None:
        if self.cap is None:
            self.values.append(scores)
            return
        keys = torch.rand(scores.numel(), generator=self.gen)  # drawn for every score: the same stream
        if self._bound is not None:
            keep = keys <= self._bound
            scores, keys = scores[keep], keys[keep]
        self.values.append(scores)
        self.keys.append(keys)
        self._held += scores.numel()
        if self._held > 2 * self.cap:  # prune now and then: the kept set does not depend on when
            self._prune()

    def _prune(self) -> None:
        """Keep the `cap` smallest (key, position) pairs, in the order they were added."""
        values, keys = torch.cat(self.values), torch.cat(self.keys)
        if values.numel() >= self.cap:
            keep = torch.sort(torch.sort(keys, stable=True).indices[: self.cap]).values
            values, keys = values[keep], keys[keep]
            self._bound = keys.max()
        self.values, self.keys, self._held = [values], [keys], values.numel()

    def result(self) -> torch.Tensor:
        if self.cap is not None:
            self._prune()
        return torch.cat(self.values) if self.values else torch.zeros(0)


@contextmanager
def _forward_hooks(targets: dict[str, nn.Linear], make: Callable[[str], Callable]) -> Iterator[None]:
    handles = [mod.register_forward_hook(make(name)) for name, mod in targets.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fgmp_layer_bits(mask: torch.Tensor, in_features: int | None = None) -> int:
    """Bits the `fgmp` format stores for one weight with this mask (R, nb).

    Per low (NVFP4) block: 16 x 4-bit codes + an 8-bit E4M3 block scale = 72 bits. Per high (FP8)
    block: 16 x 8-bit E4M3 = 128 bits; high blocks share the per-tensor scale and carry no block
    scale. Mask: 1 bit per block, each row padded to whole bytes: R * 8 * ceil(nb / 8) bits.
    Plus one FP32 per-tensor scale (32 bits). This equals `QTensor.storage_bits()` of the format.
    in_features: the unpadded K, only checked against nb.
    """
    rows, nb = mask.shape
    if in_features is not None and -(-in_features // BLOCK) != nb:
        raise InputError(f"mask has {nb} blocks per row but in_features={in_features} needs "
                         f"{-(-in_features // BLOCK)}", "pass the mask made for this weight")
    n_high = int(mask.sum())
    n_low = rows * nb - n_high
    # The format's fields, as shapes only (meta tensors: nothing allocated).
    fields = [((n_low, BLOCK // 2), torch.uint8), ((n_low,), torch.float8_e4m3fn),
              ((n_high, BLOCK), torch.float8_e4m3fn), ((rows, -(-nb // 8)), torch.uint8), ((1,), torch.float32)]
    return stored_bits(*(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in fields))


def plan_bits_per_weight(masks: dict[str, torch.Tensor], in_features: dict[str, int]) -> float:
    """Average stored bits per original weight of a plan: sum of `fgmp_layer_bits` over layers
    divided by sum of R * K (unpadded weights; padding and scales count as overhead).

    Asymptotically 4.5 + 3.5 p + 1/16 for a fraction p of high blocks, K a multiple of 128.
    """
    bits = sum(fgmp_layer_bits(m, in_features[n]) for n, m in masks.items())
    numel = sum(m.shape[0] * in_features[n] for n, m in masks.items())
    if numel == 0:
        raise InputError("plan_bits_per_weight got no layers", "pass at least one layer mask")
    return bits / numel


def high_fraction_by_group(masks: dict[str, torch.Tensor],
                           group: Callable[[str], str]) -> dict[str, float]:
    """Fraction of high blocks per group of layers, e.g. group=lambda n: n.rsplit('.', 1)[-1]
    gives one figure per projection kind (q_proj, k_proj, ...). Groups in first-seen order."""
    high: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for name, m in masks.items():
        key = group(name)
        high[key] += int(m.sum())
        total[key] += m.numel()
    return {key: high[key] / total[key] if total[key] else 0.0 for key in total}
