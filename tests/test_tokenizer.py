"""Tokenizer training for the built-in model: T5 special ids, whole words for the caption vocabulary."""

from __future__ import annotations

from segue.tokenizer import load_tokenizer, train_tokenizer


def test_trained_tokenizer_is_t5_style_and_learns_words(tmp_path):
    texts = [
        f"the {c} {s} moves to the {d} along an arc over the top while the sky turns from day to night"
        for c in ("red", "blue", "green", "yellow")
        for s in ("square", "circle", "triangle")
        for d in ("left", "right")
    ] * 5
    train_tokenizer(texts, 120, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok.ids("the green triangle moves to the left")
    assert ids[-1] == 1  # EOS appended, as T5
    pieces = tok.pieces(ids[:-1])
    assert "▁triangle" in pieces and "▁green" in pieces  # frequent caption words are single pieces
    assert len(tok) == 120
