"""Shared fixtures: a tiny random Llama with its own small tokenizer, text files, the real assets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("LPC_ASSETS", REPO.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"

SENTENCES = [
    "once upon a time there was a little girl who liked to play in the park with her dog",
    "the sun was warm and the birds sang in the tall green trees near the river",
    "tom found a shiny red ball under the bed and showed it to his mom",
    "they ate cake and laughed together until it was time to go to sleep",
    "a small cat climbed the fence to look at the big blue sky above the town",
    "the boy said thank you and gave his friend a hug before going home",
]


def build_tokenizer(path: Path):
    """A small byte-level BPE tokenizer trained on SENTENCES, adding BOS like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


def tiny_llama(vocab_size: int = 64, seed: int = 0, intermediate: int = 40, layers: int = 2, **config):
    """A random LlamaForCausalLM in eval mode, in memory: hidden 32, intermediate 40 (not a
    multiple of 16), 4 heads over 2 KV heads; `config` sets any other LlamaConfig field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **config)
    return LlamaForCausalLM(cfg).eval()


def build_tiny_llama(path: Path, seed: int = 0, intermediate: int = 40, layers: int = 2):
    """`tiny_llama` with the small tokenizer of SENTENCES, tied embeddings, saved to `path`."""
    tok = build_tokenizer(path)
    model = tiny_llama(len(tok), seed, intermediate, layers, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text")
    jsonl = d / "calib.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    txt = d / "calib.txt"
    txt.write_text(" ".join(SENTENCES * 3))
    return {"jsonl": jsonl, "txt": txt}


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"real model assets not present at {STORIES} (set LPC_ASSETS)")
    return STORIES


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"assets not present at {ASSETS} (set LPC_ASSETS)")
    return ASSETS


@pytest.fixture(scope="session")
def build_llama():
    """The tiny-Llama builder, for tests that need another depth or seed."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def aligned_dir(tmp_path_factory) -> Path:
    """The tiny Llama with every Linear input width a multiple of 32 (hidden 32, intermediate 64): block
    formats need no padding and engine exports no dense fallback."""
    path = tmp_path_factory.mktemp("tiny-llama-aligned")
    build_tiny_llama(path, intermediate=64)
    return path


@pytest.fixture(scope="session")
def make_llama():
    """The in-memory tiny-Llama builder (`tiny_llama`), for tests that need no files."""
    return tiny_llama


@pytest.fixture(scope="session")
def tokenizer_builder():
    """`build_tokenizer` for tests that build their own model (importing it from `conftest` by name picks
    whichever conftest module pytest registered first)."""
    return build_tokenizer


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family name (tests/families/zoo.py: llama, qwen2, ..., gpt2, mixtral, ..., bert, t5), padded=False ->
    the directory of that family's tiny random model with the small tokenizer (built once per session)."""
    from families.zoo import build_family

    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, padded: bool = False) -> Path:
        if (family, padded) not in built:
            path = tmp_path_factory.mktemp(f"family-{family}{'-padded' if padded else ''}")
            built[(family, padded)] = build_family(path, family, build_tokenizer, padded=padded)
        return built[(family, padded)]

    return get
