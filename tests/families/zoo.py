"""One tiny random model per Hugging Face family, built from a transformers config (no hub, no files
fetched), saved with conftest's small tokenizer.

Dimensions are the smallest that still exercise each family's code paths: hidden 32 with 4 heads of 8
over 2 KV heads, MLP width 64 (every Linear input a multiple of 32, so block formats need no padding and
engine exports hold every layer), 2 layers. `padded=True` gives hidden 72 and MLP width 200: no input
width is a multiple of 16 (every block-format layer is zero-padded).

What each family brings: Llama untied in bf16; Qwen2 q/k/v biases; Qwen3 tied with q/k norms; Mistral;
Gemma2 logit soft-capping and sliding-window layers; Gemma3 q/k norms and sliding windows; Phi-3 fused
qkv_proj / gate_up_proj; OPT and GPT-NeoX (fused query_key_value); GPT-2 Conv1D (transposed weights);
Mixtral / Qwen2-MoE / Qwen3-MoE experts as fused 3-D parameters; DeepSeek-V3 routed experts (fused
3-D) next to a shared expert (Linears), a top-k router with a score-correction bias, MLA attention; BERT an encoder with an MLM head
(`bert_pretraining`: pooler and next-sentence head too, as BERT's original checkpoints; `bert_encoder`: no
head); T5 an encoder-decoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

DENSE = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "opt", "gpt_neox", "gpt2")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def _dims(padded: bool) -> tuple[int, int]:
    return (72, 200) if padded else (32, 64)


def _decoder(cls_name: str, hidden: int, inter: int, vocab: int, **extra: Any):
    import transformers

    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    cfg = getattr(transformers, cls_name)(**{**fields, **extra})
    return cfg


def _configs(hidden: int, inter: int, vocab: int) -> dict[str, Callable[[], Any]]:
    import transformers as tf

    head = hidden // 4
    return {
        "llama": lambda: _decoder("LlamaConfig", hidden, inter, vocab, tie_word_embeddings=False, dtype="bfloat16"),
        "qwen2": lambda: _decoder("Qwen2Config", hidden, inter, vocab, tie_word_embeddings=False),
        "qwen3": lambda: _decoder("Qwen3Config", hidden, inter, vocab, head_dim=head, tie_word_embeddings=True),
        "mistral": lambda: _decoder("MistralConfig", hidden, inter, vocab, sliding_window=None),
        "gemma2": lambda: _decoder("Gemma2Config", hidden, inter, vocab, head_dim=head, sliding_window=4,
                                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=head),
        "gemma3": lambda: _decoder("Gemma3TextConfig", hidden, inter, vocab, head_dim=head, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=head),
        "phi3": lambda: _decoder("Phi3Config", hidden, inter, vocab, tie_word_embeddings=False),
        "opt": lambda: tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=hidden, max_position_embeddings=128,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=inter, n_layer=2, n_head=4,
                                      n_positions=128, bos_token_id=1, eos_token_id=2),
        "mixtral": lambda: _decoder("MixtralConfig", hidden, inter, vocab, num_local_experts=4,
                                    num_experts_per_tok=2),
        "qwen2_moe": lambda: _decoder("Qwen2MoeConfig", hidden, inter, vocab, moe_intermediate_size=inter,
                                      shared_expert_intermediate_size=inter, num_experts=4, num_experts_per_tok=2,
                                      decoder_sparse_step=1, mlp_only_layers=[]),
        "qwen3_moe": lambda: _decoder("Qwen3MoeConfig", hidden, inter, vocab, head_dim=head,
                                      moe_intermediate_size=inter, num_experts=4, num_experts_per_tok=2,
                                      decoder_sparse_step=1, mlp_only_layers=[]),
        "deepseek_v3": lambda: _decoder("DeepseekV3Config", hidden, inter, vocab, num_key_value_heads=4,
                                        moe_intermediate_size=inter, n_routed_experts=4, num_experts_per_tok=2,
                                        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                                        q_lora_rank=hidden, kv_lora_rank=hidden, qk_rope_head_dim=head,
                                        qk_nope_head_dim=head, v_head_dim=head, tie_word_embeddings=False),
        "bert": lambda: tf.BertConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                      pad_token_id=0),
        "t5": lambda: tf.T5Config(vocab_size=vocab, d_model=hidden, d_ff=inter, d_kv=head, num_layers=1,
                                  num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2),
    }


def family_model(family: str, vocab: int, padded: bool = False, seed: int = 0, **overrides: Any):
    """The random model of `family` in memory (eval mode): its own class for BERT (masked LM) and T5
    (encoder-decoder), a causal LM for every other family. `overrides` set config fields."""
    from transformers import AutoModelForCausalLM, BertForMaskedLM, T5ForConditionalGeneration

    cfg = _configs(*_dims(padded), vocab)["bert" if family.startswith("bert") else family]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    if family == "bert":
        return BertForMaskedLM(cfg).eval()
    if family in ("bert_pretraining", "bert_encoder"):  # pooler + NSP + MLM heads / the encoder alone
        from transformers import BertForPreTraining, BertModel

        return (BertForPreTraining if family == "bert_pretraining" else BertModel)(cfg).eval()
    if family == "t5":
        return T5ForConditionalGeneration(cfg).eval()
    dtype = getattr(torch, str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch."))
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # some families initialise norms/biases to constants: make every tensor random
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def build_family(path: Path, family: str, build_tokenizer: Callable[[Path], Any], padded: bool = False,
                 seed: int = 0, edit: Callable[[Any], None] | None = None, **overrides: Any) -> Path:
    """Save the tiny `family` model with the small tokenizer to `path`; returns `path`.

    edit: called on the model before saving (e.g. to set router weights); overrides: config fields."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    model = family_model(family, len(tok), padded, seed, **overrides)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
