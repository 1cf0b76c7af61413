"""A replica's per-token pieces of the decoded text (what the gateway streams token by token)."""

from __future__ import annotations

from gpu_workers.replica import token_pieces
from gpu_workers.tiny_model import EOS_ID, build_byte_tokenizer


def test_pieces_concatenate_to_the_decoded_text_one_per_token() -> None:
    tokenizer = build_byte_tokenizer()
    tokens = [*tokenizer.encode("hi there", add_special_tokens=False), EOS_ID]

    pieces = token_pieces(tokenizer.decode, tokens)

    assert pieces == ["h", "i", " ", "t", "h", "e", "r", "e", ""]  # eos decodes to nothing


def test_a_character_split_over_tokens_is_carried_by_the_token_that_completes_it() -> None:
    tokenizer = build_byte_tokenizer()
    tokens = tokenizer.encode("aé€", add_special_tokens=False)  # 1 + 2 + 3 bytes

    pieces = token_pieces(tokenizer.decode, tokens)

    assert pieces == ["a", "", "é", "", "", "€"]
    assert "".join(pieces) == tokenizer.decode(tokens)


def test_an_unfinished_last_character_is_kept_as_the_decoder_renders_it() -> None:
    tokenizer = build_byte_tokenizer()
    tokens = tokenizer.encode("a€", add_special_tokens=False)[:-1]  # cut inside the euro sign

    assert "".join(token_pieces(tokenizer.decode, tokens)) == tokenizer.decode(tokens)
