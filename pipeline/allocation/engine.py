"""Engine-loadable allocation (`allocate.engine: vllm`): VaPr chooses among layouts an inference engine
runs (ENGINE_FORMATS) and gives the Linears an engine fuses into one GEMM (q/k/v, gate/up: the recipe's
`quantize.fuse_groups`) one format together, since vLLM refuses a fused layer whose shards differ
("some but not all shards quantized"). The fused group enters the knapsack as one item whose options
cost the members' summed stored bits (exact Fractions) and summed predicted losses."""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

from lpc.pipeline.allocation.knapsack import Layer, Option
from lpc.pipeline.io.models import fuse_groups

ENGINE_FORMATS = ("bf16", "fp8_e4m3", "nvfp4", "mxfp4", "mxfp8")
ENGINES = ("vllm",)
GROUP_SEP = "+"  # joins the names of a fused group's members (Linear names never hold it)


def engine_groups(layers: Sequence[Layer], groups: list[list[str]]) -> list[Layer]:
    """Each fused group of `layers` merged into one Layer `a+b+c` (options in the same order)."""
    by_name = {layer.name: layer for layer in layers}
    out = []
    for group in fuse_groups([layer.name for layer in layers], groups):
        members = [by_name[n] for n in group]
        if len(members) == 1:
            out.append(members[0])
            continue
        numel = sum(m.numel for m in members)
        options = tuple(Option(o.label, sum(Fraction(m.options[i].bits_per_weight) * m.numel for m in members) / numel,
                               sum(m.options[i].loss for m in members))
                        for i, o in enumerate(members[0].options))
        out.append(Layer(GROUP_SEP.join(group), numel, options))
    return out


def members(name: str) -> list[str]:
    """The Linear names a knapsack item stands for (one, or a fused group's)."""
    return name.split(GROUP_SEP)


def expand(choice: dict[str, str]) -> dict[str, str]:
    """{item: label} -> {Linear: label}."""
    return {m: label for name, label in choice.items() for m in members(name)}
