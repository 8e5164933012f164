"""Tokenizer loading (umT5's, from a local folder or a bundle) and a tiny T5-style tokenizer for tests.

A loaded tokenizer is a ``Tokenizer``: ids with EOS, batches padded to a length, the special ids. A
tokenizer folder that is a plain ``tokenizer.json`` (what segue writes: the built-in model, tiny
checkpoints; its ``tokenizer_config.json`` names the generic class and the special tokens only) runs on the
``tokenizers`` library alone, with the settings transformers would give it; any other folder (umT5-XXL's
``T5Tokenizer`` folder, a ``spiece.model`` without ``tokenizer.json``) goes through transformers'
``AutoTokenizer``, whose import costs seconds.

The tiny tokenizer is a Unigram model built by hand from a short built-in English text, so it is
deterministic and needs no download: pad 0, eos 1 ``</s>``, unk 2, then single characters, then whole
words by frequency, then letter pairs until exactly ``vocab_size`` pieces. Like T5 it splits on
spaces with the ``▁`` marker and appends ``</s>`` to every sequence.
"""

from __future__ import annotations

import json
import math
import string
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor

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


# A tokenizer_config.json that adds nothing to its tokenizer.json: the generic class, the special tokens
# by name (transformers' other settings, e.g. padding on the left or extra special tokens, would change
# what it does: such a folder takes transformers' path).
_PLAIN_CONFIG_KEYS = {"backend", "eos_token", "model_max_length", "pad_token", "tokenizer_class", "unk_token"}
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class Tokenizer(ABC):
    """What the text encoder needs of a tokenizer (T5 style: EOS appended, padding at the end)."""

    pad_token_id: int
    eos_token_id: int
    unk_token_id: int

    @abstractmethod
    def __len__(self) -> int:
        """The number of ids (the vocabulary with its added tokens)."""

    @abstractmethod
    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        """The ids of ``text`` with EOS; at most ``max_length`` of them (EOS kept) when given."""

    @abstractmethod
    def batch(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        """ids and mask (1 = token), int64 [B, length]: each text truncated to ``length`` ids (EOS kept),
        then padded at the end with the pad id."""

    @abstractmethod
    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary piece of each id."""


class FileTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer read from a plain ``tokenizer.json``, run with transformers' settings for
    ``tokenizer(texts, padding="max_length", truncation=True, max_length=length)``."""

    def __init__(self, backend: Any, pad: str, eos: str, unk: str) -> None:
        backend.no_truncation()  # each call sets its own, as transformers does (a file's defaults never apply)
        backend.no_padding()
        self.backend = backend
        self.pad_token = pad
        self.pad_token_id, self.eos_token_id, self.unk_token_id = (backend.token_to_id(t) for t in (pad, eos, unk))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _encode(self, texts: list[str], length: int | None, pad: bool) -> list[Any]:
        tok = self.backend
        if length is not None:
            tok.enable_truncation(max_length=length, stride=0, strategy="longest_first", direction="right")
        if pad:
            tok.enable_padding(length=length, direction="right", pad_id=self.pad_token_id, pad_type_id=0,
                               pad_token=self.pad_token, pad_to_multiple_of=None)  # fmt: skip
        try:
            return tok.encode_batch(texts, add_special_tokens=True)
        finally:
            tok.no_truncation()
            tok.no_padding()

    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        return list(self._encode([text], max_length, pad=False)[0].ids)

    def batch(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        import torch

        encs = self._encode(list(texts), length, pad=True)
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)  # [B, length]
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)  # [B, length]
        return ids, mask

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]


class TransformersTokenizer(Tokenizer):
    """A tokenizer of transformers (``AutoTokenizer``), called as the reference calls it."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.pad_token_id, self.eos_token_id, self.unk_token_id = hf.pad_token_id, hf.eos_token_id, hf.unk_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        return list(self.hf(text, truncation=max_length is not None, max_length=max_length).input_ids)

    def batch(self, texts: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
        batch = self.hf(list(texts), padding="max_length", truncation=True, max_length=length,
                        add_special_tokens=True, return_tensors="pt")  # fmt: skip
        return batch["input_ids"], batch["attention_mask"]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))


def plain_tokenizer(files: Mapping[str, str], origin: str) -> FileTokenizer | None:
    """A FileTokenizer from a tokenizer folder's files (name -> text) when they are a plain ``tokenizer.json``
    (see the module docstring); None when transformers must load them. CheckpointError for a file that
    is not what its name says."""
    if set(files) != {"tokenizer.json", "tokenizer_config.json"}:
        return None
    try:
        config = json.loads(files["tokenizer_config.json"])
    except ValueError as e:
        raise CheckpointError(f"{origin}: tokenizer_config.json is not JSON ({e})") from None
    if not (isinstance(config, dict) and set(config) <= _PLAIN_CONFIG_KEYS):
        return None
    specials = [config.get(k) for k in ("pad_token", "eos_token", "unk_token")]
    if config.get("tokenizer_class") not in _PLAIN_CLASSES or config.get("backend", "tokenizers") != "tokenizers":
        return None
    if not all(isinstance(t, str) for t in specials):
        return None
    try:
        added = json.loads(files["tokenizer.json"]).get("added_tokens") or []
        special_added = {t["content"] for t in added if t.get("special")}
    except (ValueError, AttributeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{origin}: tokenizer.json is not a tokenizer description ({e})") from None
    if not set(specials) <= special_added:  # transformers would add them as special tokens first
        return None
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_str(files["tokenizer.json"])
    except Exception as e:  # the tokenizers library raises plain Exceptions for a bad description
        raise CheckpointError(f"{origin}: tokenizer.json cannot be loaded ({e})") from None
    return FileTokenizer(backend, *specials)


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a local folder, offline; CheckpointError naming the folder on failure."""
    folder = Path(folder)
    expected = " or ".join(TOKENIZER_FILES[:2]) + f" (with {TOKENIZER_FILES[2]})"
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} does not exist; it should hold {expected}")
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if set(present) == {"tokenizer.json", "tokenizer_config.json"}:
        try:
            files = {n: (folder / n).read_text(encoding="utf-8") for n in present}
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the tokenizer files in {folder} ({e})") from None
        plain = plain_tokenizer(files, str(folder))
        if plain is not None:
            return plain
    from transformers import AutoTokenizer

    try:
        return TransformersTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
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
