"""A published model's own text tokenizer (`tokenizer.text=hf`, `tokenizer.path=FOLDER`).

FOLDER holds `tokenizer.json` (read with Hugging Face's `tokenizers`) or `tokenizer.model`
(sentencepiece), and optionally `tokenizer_config.json` / `special_tokens_map.json` naming its
special tokens. Text is encoded as plain text: no special tokens are added (documents get this
project's bos/eos from the vocabulary), and special-token strings inside it (`</s>`,
`<racm3:break>`) are encoded as the text they are, so `decode(encode(text)) == text` wherever
the tokenizer itself round-trips (byte-level BPE does; sentencepiece normalisation may not).
"""

from __future__ import annotations

from pathlib import Path

from mm_moe.errors import UserError
from mm_moe.utils.json_files import read_json_object

FILES = ("tokenizer.json", "tokenizer.model")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Files that make up a tokenizer folder (copied by the upcycling import).
TOKENIZER_FILES = (*FILES, *CONFIG_FILES, "added_tokens.json")


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in FILES)


def _special_names(folder: Path) -> dict[str, str]:
    """{bos|eos|pad: token string} as the tokenizer's config files name them."""
    names = {}
    for config in CONFIG_FILES:
        path = folder / config
        if not path.is_file():
            continue
        data = read_json_object(path, "a Hugging Face tokenizer's special tokens")
        for key in ("bos", "eos", "pad"):
            value = data.get(f"{key}_token")
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str) and key not in names:
                names[key] = value
    return names


def _read(load, path: Path):
    """A tokenizer file read by its library; a damaged one is a UserError naming it."""
    try:
        return load(str(path))
    except Exception as exc:  # noqa: BLE001 - the libraries raise their own kinds
        raise UserError(
            f"{path} cannot be read as a tokenizer ({exc.__class__.__name__}: {exc}); "
            "tokenizer.text=hf needs a Hugging Face tokenizer.json or a sentencepiece "
            "tokenizer.model"
        ) from exc


class HFTextTokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder, self._tok, self._sp = folder, None, None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = _read(Tokenizer.from_file, folder / "tokenizer.json")
            # Raw text is plain text: "</s>" or "<racm3:break>" inside a document must not
            # become a special id (HF matches added special tokens in the input otherwise).
            self._tok.encode_special_tokens = True
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            from mm_moe.tokenization.sentencepiece_text import PlainEncoder

            model = folder / "tokenizer.model"
            self._sp = _read(lambda f: spm.SentencePieceProcessor(model_file=f), model)
            self._plain = PlainEncoder(self._sp)
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise UserError(
                f"tokenizer.path={folder} holds neither tokenizer.json nor tokenizer.model "
                "(tokenizer.text=hf reads a published model's tokenizer folder)"
            )
        specials = {key: self.token_id(name) for key, name in _special_names(folder).items()}
        self.bos, self.eos, self.pad = (specials.get(k) for k in ("bos", "eos", "pad"))

    def token_id(self, token: str) -> int | None:
        """The id of a token string, None when the tokenizer lacks it."""
        if self._tok is not None:
            return self._tok.token_to_id(token)
        idx = self._sp.piece_to_id(token)
        unk = self._sp.unk_id()
        return None if idx == unk and token != self._sp.id_to_piece(unk) else idx

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._plain.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        return self._sp.decode(list(ids))
