"""Tokenizer loading (umT5's, from a local folder) and a tiny T5-style tokenizer for tests.

The tiny tokenizer is a Unigram model built by hand from a short built-in English text, so it is
deterministic and needs no download: pad 0, eos 1 ``</s>``, unk 2, then single characters, then whole
words by frequency, then letter pairs until exactly ``vocab_size`` pieces. Like T5 it splits on
spaces with the ``▁`` marker and appends ``</s>`` to every sequence.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Files a tokenizer folder normally holds (umT5: tokenizer.json or spiece.model + tokenizer_config.json).
TOKENIZER_FILES = (
    "tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip

_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_SPACE = "\u2581"  # sentencepiece's word-start marker "▁"

_CORPUS = """
Two keyframes and a prompt go in, and a smooth video comes out. The first frame shows a quiet street
at dawn; the last frame shows the same street at night, full of light and people. A camera moves
slowly forward while the sky turns from pale blue to deep orange and then to dark purple. A cat walks
across the road, a small boat drifts on the river, and a woman with a red umbrella waits near the old
bridge. The wind moves the trees, the water reflects the city, and birds fly over the roofs. In the
garden a child plays with a dog on the green grass under a warm summer sun. The mountains in the
distance are covered with snow, and the clouds slowly pass over the valley. A man rides a bicycle
along the beach, waves break on the sand, and the light of the evening is soft and golden. The
picture is sharp, detailed, realistic, cinematic, and the motion is natural and stable.
"""


def load_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer`` from a local folder, offline; CheckpointError naming the folder on failure."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    expected = " or ".join(TOKENIZER_FILES[:2]) + f" (with {TOKENIZER_FILES[2]})"
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist; it should hold {expected}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, TypeError, ...)
        raise CheckpointError(f"cannot load a tokenizer from {folder}: expected {expected} ({err})") from err


def _tiny_vocab(vocab_size: int, corpus: str = _CORPUS) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability-like scores: words beat spelling them out."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIALS]
    pieces += [(_SPACE, -9.0)] + [(c, -10.0) for c in chars]
    words = Counter(w.lower() for w in corpus.replace(",", " ").replace(".", " ").replace(";", " ").split())
    total = sum(words.values())
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    pieces += [(_SPACE + w, math.log(n / total)) for w, n in ranked]
    letters = string.ascii_lowercase
    pieces += [(_SPACE + a + b, -8.0) for a in letters for b in letters]
    seen: set[str] = set()
    unique = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]
    smallest = len(_SPECIALS) + 1 + len(chars)  # every character must stay spellable
    if not smallest <= vocab_size <= len(unique):
        raise ValueError(f"tiny tokenizer vocab_size must be in [{smallest}, {len(unique)}]: {vocab_size}")
    return unique[:vocab_size]


def save_tiny_tokenizer(dest: Path, vocab_size: int) -> None:
    """Write a small T5-style tokenizer folder with exactly ``vocab_size`` ids (deterministic, offline)."""
    from tokenizers import Tokenizer, models

    _save_t5_style(Tokenizer(models.Unigram(_tiny_vocab(vocab_size), unk_id=2)), Path(dest))


def train_tokenizer(texts: Iterable[str], vocab_size: int, dest: Path) -> None:
    """A T5-style Unigram tokenizer (pad 0, ``</s>`` 1, unk 2; EOS appended) for ``texts``: every
    character stays spellable and the most frequent words become single pieces, scored by frequency.

    Used for the built-in default model, whose captions come from a small fixed vocabulary (the
    library's Unigram trainer collapses to characters on such a small, repetitive corpus)."""
    from tokenizers import Tokenizer, models

    pieces = _tiny_vocab(vocab_size, corpus=" ".join(texts))
    _save_t5_style(Tokenizer(models.Unigram(pieces, unk_id=2)), Path(dest))


def _t5_pipeline(tok: Any) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )


def _save_t5_style(tok: Any, dest: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    _t5_pipeline(tok)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dest))
