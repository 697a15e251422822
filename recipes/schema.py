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


class DistillConfig(Section):
    """`method: distill`: tune the weights so the quantized model predicts like the original."""

    steps: int = Field(100, ge=0, description="optimizer steps at most (each one pass over the training sequences)")
    lr: float = Field(1e-3, gt=0, description="Adam step, relative to each layer's weight RMS")
    eval_every: int = Field(10, ge=1, description="steps between held-out KL measurements")
    patience: int = Field(3, ge=1, description="stop after this many measurements without improvement")
    val_fraction: float = Field(0.125, ge=0, lt=1, description="calibration sequences held out to pick the best step")
    batch_rows: int = Field(8, ge=1, description="sequences per forward pass (padded to the longest)")


class TuneConfig(Section):
    """`method: tune`: tune each decoder layer's weights so the layer reproduces the original layer's outputs."""

    steps: int = Field(40, ge=0, description="optimizer steps per decoder layer at most")
    lr: float = Field(3e-3, gt=0, description="Adam step, relative to each weight's RMS")
    samples_per_step: int = Field(4, ge=1, description="calibration samples whose gradients make one step")
    eval_every: int = Field(5, ge=1, description="steps between held-out error measurements")
    patience: int = Field(2, ge=1, description="stop a layer after this many measurements without improvement")
    val_fraction: float = Field(0.125, ge=0, lt=1, description="calibration samples held out to pick the best step")
    inputs: Literal["quantized", "original"] = Field(
        "quantized", description="each layer's inputs: the hidden states of the already-quantized layers, or the "
                                 "original model's (the target is always the original layer's output on the original's)")
    amp: Literal["bf16", "none"] = Field(
        "bf16", description="the training steps' forward and backward under bf16 autocast (the held-out "
                            "measurements, the kept rounding and the next layer's inputs stay in the layer's dtype)")


class QuantizeConfig(Section):
    weights: TensorQuant
    activations: TensorQuant | None = Field(None, description="simulated activation quantization")
    fuse_groups: list[list[str]] = Field(
        default_factory=lambda: [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
        description="sibling Linears that share one global scale (engines fuse them)")
    importance: Literal["none", "act_second_moment"] = Field(
        "act_second_moment", description="weight of each input channel in scale selection")
    overrides: list[LayerOverride] = Field(default_factory=list)
    codebook_scope: Literal["model", "tensor"] = Field(
        "model", description="LO-BCQ: fit one codebook set over all bcq layers, or one per tensor")
    method: str = Field(
        "rtn", description="a registered quantize method: rtn: round each weight; gptq: second-order error feedback over the "
                           "calibrated X^T X (block formats; needs a calibration); distill: tune the "
                           "weights so the quantized model matches the original's predictions on the "
                           "calibration text (KL, straight-through; needs a calibration); tune: the same "
                           "one decoder layer at a time against the original layer's outputs (needs a calibration)")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


class AllocateConfig(Section):
    """Precision allocation: FGMP block policy (and its baselines) or a VaPr-style format search."""

    policy: str = Field("fgmp", description="a registered allocation policy: fgmp, random, magnitude, vapr")
    fraction: float = Field(0.3, ge=0, le=1, description="FGMP: share of blocks kept in FP8 (model-wide)")
    clip: Literal["none", "mse", "sensitivity"] = Field("sensitivity", description="clipping of the NVFP4 blocks")
    activations: bool = Field(False, description="FGMP: also mix activation blocks (simulated at eval)")
    budget_bits: float | None = Field(None, gt=0, description="VaPr: average bits per weight allowed")
    candidates: list[TensorQuant] = Field(default_factory=list, description="VaPr: formats to choose from")
    predictor: Literal["fisher", "measured"] = Field("fisher", description="VaPr: sensitivity estimate")
    refine: bool = Field(False, description="VaPr: refine the knapsack choice with measured loss")
    pareto_budgets: list[float] = Field(default_factory=list, description="VaPr: also solve at these budgets")
    engine: Literal["vllm"] | None = Field(
        None, description="VaPr: only layouts engines run (bf16, fp8_e4m3, nvfp4, mxfp4, mxfp8) and one format per "
                          "fused group (q/k/v, gate/up), so the mix exports to compressed-tensors / modelopt")
    seed: int = 0

    @model_validator(mode="after")
    def _vapr_needs_a_budget(self) -> "AllocateConfig":
        if self.policy == "vapr" and self.budget_bits is None:
            raise ValueError("the vapr policy needs a budget: set allocate.budget_bits, e.g. --set allocate.budget_bits=5.5")
        return self

    @model_validator(mode="after")
    def _engine_candidates(self) -> "AllocateConfig":
        engine_formats = ("bf16", "fp8_e4m3", "nvfp4", "mxfp4", "mxfp8")  # = allocation/engine.py ENGINE_FORMATS
        kept = [c.format for c in self.candidates if c.format in engine_formats]
        if self.engine is not None and self.candidates and not kept:
            raise ValueError(f"allocate.engine={self.engine} runs {', '.join(engine_formats)}, and no candidate "
                             f"({', '.join(c.format for c in self.candidates)}) is one: add one, or unset allocate.engine")
        return self


class CompensateConfig(Section):
    """Low-rank paths: EoRA, plain SVD, or ESPACE projections."""

    method: str = Field("eora", description="a registered compensation method: eora, svd, espace")
    rank: int = Field(8, gt=0, description="rank of every layer (unless a budget is given)")
    budget_params: int | None = Field(None, gt=0, description="total extra parameters, spread over layers")
    espace_stat: Literal["act", "weight", "grad"] = Field("act", description="ESPACE statistic")
    normalize_rows: bool = Field(False, description="ESPACE: normalize the statistic per input channel")
    mode: Literal["residual", "compress"] = Field("residual", description="ESPACE: residual path or layer compression")
    factor_format: Literal["bf16", "fp32", "fp8_e4m3", "nvfp4"] = Field("bf16", description="storage of the factors")

    @model_validator(mode="after")
    def _compress_mode_is_espace(self) -> "CompensateConfig":
        if self.mode == "compress" and self.method != "espace":
            raise ValueError(f"compensate.mode=compress needs method espace, got method {self.method}: use "
                             "--set compensate.method=espace, or --set compensate.mode=residual")
        return self


class ExportConfig(Section):
    format: str = Field("auto", description="a registered exporter: auto (compressed-tensors when it holds every "
                                             "quantized layer, else lpc), compressed-tensors, modelopt, lpc, dense, peft")


class EvalConfig(Section):
    ppl: list[str] = Field(default_factory=list, description="text files (.jsonl/.txt) for perplexity")
    seq_len: int = Field(256, gt=1)
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names")
    limit: int | None = Field(None, gt=0)
    fail_under_recovery: float | None = Field(None, gt=0, le=1.5)


# The names registered in lpc.pipeline.kvcache.policy.POLICIES (recipes/ may not import the pipeline;
# tests/kvcache keeps the two equal).
KV_POLICIES = ("h2o", "streaming", "thinkv", "uniform")


class KVCacheConfig(TensorQuant):
    """KV cache quantization, simulated through a quantize-on-write cache at evaluation; or a cache
    policy (eviction / mixed precision under a byte budget) simulated by `lpc eval`."""

    format: str = Field("bf16", description="a registered format name (`lpc formats`); bf16 with a policy")
    policy: str | None = Field(None, description="a KV cache policy simulated at evaluation: thinkv, h2o, "
                                                 "streaming, uniform (it chooses the precision itself)")
    budget: float | None = Field(None, gt=0, le=1, description="the policy's KV budget, a fraction of the bf16 "
                                                               "cache bytes (scales and metadata counted)")
    policy_options: dict[str, Any] = Field(default_factory=dict, description="the policy's options, e.g. "
                                                                             "{level: int2} for uniform")

    @model_validator(mode="after")
    def _policy_is_known(self) -> "KVCacheConfig":
        if self.policy is None:
            if self.budget is not None or self.policy_options:
                raise ValueError("kv_cache.budget and kv_cache.policy_options need kv_cache.policy "
                                 "(thinkv, h2o, streaming, uniform)")
            return self
        if self.format != "bf16":
            raise ValueError(f"kv_cache.policy={self.policy} chooses the KV precision itself; drop "
                             f"kv_cache.format={self.format} (or use policy uniform with policy_options.level)")
        if self.budget is None:
            raise ValueError(f"kv_cache.policy={self.policy} needs kv_cache.budget, e.g. 0.1 for 10% of the bf16 bytes")
        if self.policy.lower().replace("-", "_") not in KV_POLICIES:
            raise ValueError(f"kv_cache: unknown KV cache policy '{self.policy}'; known: {', '.join(KV_POLICIES)} "
                             "(options are checked when the policy is built, at evaluation)")
        return self

    scales: Literal["tensor", "head", "dynamic", "token"] = Field(
        "tensor", description="static scales from the calibrated K/V absmax of each layer (tensor) or KV head "
                              "(head), only the format's own dynamic block scales (dynamic), or an FP32 scale "
                              "per token and head taken when written (token)")
    sinks: int = Field(0, ge=0, description="leading tokens of every sequence kept at full precision "
                                            "(attention sinks)")
    rotate: bool = Field(False, description="store K/V rotated by the Hadamard matrix of head_dim (spreads "
                                            "outlier channels; the engine rotates queries the same way)")
    headroom: float | None = Field(None, ge=1, description="static scales from headroom x the calibrated absmax, so "
                                                           "tokens beyond the calibration's absmax are not clipped "
                                                           "(free for FP8/NVFP4 scales up to a few binades); None = 1")
    kivi: bool = Field(False, description="KIVI: keys grouped per channel along tokens, values per token")
    group: int = Field(32, gt=0, description="KIVI: tokens per key group (a shorter recent tail stays full precision)")
    smooth: bool = Field(False, description="fold per-channel power-of-two factors into q_proj/k_proj (and "
                                            "v_proj/o_proj) so the cache holds flatter keys; exact, engines need "
                                            "nothing new (lpc.pipeline.kvcache.smooth)")
    smooth_alpha: float = Field(1.0, ge=0, le=1, description="smoothing strength for keys: factor "
                                                             "2^round(alpha log2(channel amax / median))")
    smooth_values: float = Field(0.0, ge=0, le=1, description="the same strength for values (0: values left alone)")
    scale_search: bool = Field(False, description="per layer, the static K/V scale multiplier in [1, 2) with the "
                                                  "least attention error on the calibration sample (engines load "
                                                  "the scale as any other)")


class Recipe(Section):
    """A full compression recipe. `lpc recipes` lists the built-in ones."""

    name: str
    description: str = ""
    targets: list[str] = Field(default_factory=lambda: ["*"], description="globs of Linear names to quantize")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="globs of Linear names to skip")
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    quantize: QuantizeConfig
    allocate: AllocateConfig | None = None
    compensate: CompensateConfig | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    kv_cache: KVCacheConfig | None = Field(None, description="KV cache quantization (format, scales, KIVI)")
