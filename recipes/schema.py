"""Recipe schema: every section a pydantic model with extra="forbid", so a typo fails loudly."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lpc.formats import get_format, list_formats
from lpc.formats.errors import FormatError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrateConfig(Section):
    samples: int = Field(32, gt=0, description="calibration sequences")
    seq_len: int = Field(256, gt=1, description="tokens per sequence (longer texts are truncated)")
    fisher: bool = Field(False, description="also collect Fisher statistics (backward passes)")
    seed: int = Field(0, description="seed for sampling (`--data self`) and any random choice")


class TensorQuant(Section):
    """A format and its spec for one kind of tensor."""

    format: str = Field(description="a registered format name (`lpc formats`)")
    spec: dict[str, Any] = Field(default_factory=dict, description="format options (see `lpc formats`)")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        try:
            get_format(v)
        except FormatError:
            raise ValueError(f"unknown format '{v}'; known formats: {', '.join(list_formats())}") from None
        return v.lower().replace("-", "_")

    @model_validator(mode="after")
    def _valid_spec(self) -> "TensorQuant":
        try:
            get_format(self.format).spec(**self.spec)
        except FormatError as err:
            raise ValueError(str(err)) from None
        return self


class LayerOverride(Section):
    """Give the Linears whose names match `match` (a glob) another weight format."""

    match: str
    weights: TensorQuant | None = Field(None, description="null keeps those layers unquantized")


class QuantizeConfig(Section):
    weights: TensorQuant
    activations: TensorQuant | None = Field(None, description="simulated activation quantization")
    fuse_groups: list[list[str]] = Field(
        default_factory=lambda: [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
        description="sibling Linears that share one global scale (engines fuse them)")
    importance: Literal["none", "act_second_moment"] = Field(
        "act_second_moment", description="weight of each input channel in scale selection")
    overrides: list[LayerOverride] = Field(default_factory=list)


class ExportConfig(Section):
    format: Literal["lpc", "dense"] = "lpc"


class EvalConfig(Section):
    ppl: list[str] = Field(default_factory=list, description="text files (.jsonl/.txt) for perplexity")
    seq_len: int = Field(256, gt=1)
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names")
    limit: int | None = Field(None, gt=0)
    fail_under_recovery: float | None = Field(None, gt=0, le=1.5)


class Recipe(Section):
    """A full compression recipe. `lpc recipes` lists the built-in ones."""

    name: str
    description: str = ""
    targets: list[str] = Field(default_factory=lambda: ["*"], description="globs of Linear names to quantize")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="globs of Linear names to skip")
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    quantize: QuantizeConfig
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
