"""A tiny random-init Llama-architecture causal LM and byte-level tokenizer, as a plain HF folder.

No model hub is reachable from the machines loopstream is tested on, so the project makes its own
model. It is saved with `save_pretrained` and read back with `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained`: the code that loads it is the code that loads a real model folder.

Token ids 0..255 are the raw bytes, so `token_id == byte value`; the specials come after them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

NUM_BYTES = 256
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(NUM_BYTES, NUM_BYTES + len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 64  # d_model; ~99k parameters in all with the defaults below
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # attention heads (no grouped-query attention: kv heads = heads)
    intermediate_size: int = 128  # SwiGLU MLP width
    max_position_embeddings: int = 512  # longest sequence the RoPE config advertises
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix, as small Llamas do
    init_std: float = 0.02  # std of the normal init of every linear/embedding weight


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer in the standard `tokenizers` format: one token per byte, no merges.

    The GPT-2 byte-to-unicode alphabet gives each byte a printable stand-in character; a BPE model
    whose vocabulary is exactly that alphabet (and no merges) maps byte b to id b.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 stand-in characters, one per byte
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(NUM_BYTES)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    # No regex split and no prefix space: the text's bytes map to tokens one to one.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Like Llama's tokenizer, encoding with special tokens prepends <bos>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=TinyModelConfig.max_position_embeddings,
    )


def build_tiny_model(config: TinyModelConfig, *, seed: int) -> LlamaForCausalLM:
    hf_config = LlamaConfig(
        vocab_size=NUM_BYTES + len(SPECIAL_TOKENS),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.init_std,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attention_dropout=0.0,
    )
    # A private generator keeps the caller's global RNG untouched; fork_rng is the cheap way.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model.to(torch.float32)


def ensure_tiny_model(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Create the tiny model folder at `path` unless it is already there; return the path.

    Idempotent and safe against concurrent callers: the folder is written beside its final place
    and renamed into it, so a reader never sees half a model. Same seed -> same bytes.
    """
    from gpu_workers.manifest import write_manifest

    target = Path(path)
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    hf_logging.disable_progress_bar()  # a shard-writing progress bar is noise in a worker's log
    try:
        model = build_tiny_model(TinyModelConfig(), seed=seed)
        model.save_pretrained(staging)
        build_byte_tokenizer().save_pretrained(staging)
        write_manifest(staging, kind="base_model", metadata={"seed": seed, "source": "tiny"})
        try:
            staging.rename(target)
        except OSError:
            # Someone else finished first (rename onto a non-empty folder fails): theirs is as
            # good as ours, since both came from the same seed.
            if not (target / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of ByteLevel)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(NUM_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTES + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
