"""The lpc quantizer for transformers: `from_pretrained` on an lpc artifact gives lpc's own model.

Importing this module (done by `lpc.pipeline.artifact.load`, hence by `import lpc.pipeline...`)
registers `quant_method: "lpc"` with transformers' public hooks (`register_quantization_config`,
`register_quantizer`). After that, `AutoModelForCausalLM.from_pretrained(artifact)` builds the model,
lets transformers read the plain tensors, and then fills every quantized Linear with lpc's dequantized
weight and attaches lpc's hooks (low-rank paths, simulated activation quantization), through the same
`fill_from_lpc` that `lpc.pipeline.artifact.load.load` uses: the logits are lpc's exactly.

Without lpc imported, transformers does not know "lpc", skips the quantizer, and then meets the empty
`<m>.weight` markers of the artifact (artifact/lpc_model.py): it raises a size-mismatch RuntimeError
instead of returning a model with random Linear weights.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from lpc.pipeline.errors import ArtifactError

log = logging.getLogger(__name__)

QUANT_METHOD = "lpc"  # = lpc_model.QUANT_METHOD (not imported: this module must stay import-light)


class LpcQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of an lpc artifact, kept as written (layers, activations, ...)."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)
        self.quant_method = QUANT_METHOD

    def lpc_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items()}


class LpcHfQuantizer(HfQuantizer):
    """Loads a pre-quantized lpc artifact by dequantizing it with lpc (no on-the-fly quantization)."""

    requires_calibration = True  # refuses pre_quantized=False: lpc quantizes through `lpc quantize`

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.directory: Path | None = None
        qconfig = quantization_config.to_dict()
        lowrank = (qconfig.get("lowrank") or {}).get("layers") or {}
        self.packed = sorted(set(qconfig.get("layers", {})) | set(lowrank))

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = [Path(f) for f in checkpoint_files or []]
        if len(files) != 1 or files[0].suffix != ".safetensors":
            raise ArtifactError(f"an lpc artifact is one model.safetensors file, got {[str(f) for f in files]}",
                                "load it with lpc.pipeline.artifact.load.load(dir)")
        self.directory = files[0].parent
        # the packed fields (<m>.qdata, <m>.scale, ...) and lpc's auxiliary tensors are read by lpc itself
        fields = [rf"^{re.escape(n)}\.(?!weight$|bias$)" for n in self.packed] + [r"^lpc\."]
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | set(fields)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        """The `<m>.weight` markers of packed Linears: their shape differs on purpose (lpc fills them)."""
        return param_name.endswith(".weight") and param_name.removesuffix(".weight") in self.packed

    def _process_model_after_weight_loading(self, model, **kwargs):
        from lpc.pipeline.artifact.load import fill_from_lpc

        fill_from_lpc(model, self.directory, self.quantization_config.to_dict())
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return False  # save the artifact with lpc (lpc export), not the dequantized model under "lpc"

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the lpc config and quantizer with transformers (once per process)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(LpcQuantizationConfig)
    register_quantizer(QUANT_METHOD)(LpcHfQuantizer)


register()
