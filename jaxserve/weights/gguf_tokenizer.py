"""Build a HF fast tokenizer (`tokenizers.Tokenizer`) from a GGUF file's `tokenizer.ggml.*` metadata.

No transformers, no torch: the vocabulary is read with `gguf` and assembled from `tokenizers`' own model,
normalizer, pre-tokenizer and decoder classes, in the shapes transformers' GGUF converter gives them
(`transformers.integrations.gguf.gguf_tokenizer_mapping` in 5.25: `gemma_tokenizer`,
`sentencepiece_tokenizer`, `byte_level_tokenizer`), so a file converts to the same tokenizer either way
(`tests/test_tokenizer.py` checks the embedded Gemma 3 against ids transformers produced, and the
SentencePiece / byte-level shapes against the tokenizers they were written from).

`tokenizer.ggml.model`:
- `llama` (SentencePiece BPE with byte fallback): Llama 2, Mistral; Gemma 2/3 with Gemma's own spelling.
- `gpt2` (byte-level BPE, merges in the file): Llama 3, Qwen2; the split regex chosen by `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import os
from typing import Optional

from jaxserve.errors import CheckpointError

# llama.cpp's token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (matched whole, not special).
_CONTROL, _USER_DEFINED = 3, 4
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the regexes the models' own tokenizer.json files use).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def read_tokenizer_fields(path: str) -> dict:
    """`tokenizer.ggml.<key>` -> value for every tokenizer field of the file, plus `architecture`."""
    from jaxserve.weights.gguf_loader import _field_value, open_gguf

    reader = open_gguf(path)
    try:
        fields = {k[len("tokenizer.ggml."):]: _field_value(f) for k, f in reader.fields.items()
                  if k.startswith("tokenizer.ggml.")}
        arch = reader.fields.get("general.architecture")
        fields["architecture"] = _field_value(arch) if arch is not None else None
        if "tokenizer.chat_template" in reader.fields:
            fields["chat_template"] = _field_value(reader.fields["tokenizer.chat_template"])
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt tokenizer metadata ({type(e).__name__}: {e})") from None
    return fields


def derive_merges(vocab: dict, rank: dict) -> list:
    """BPE merges implied by a vocabulary that lists none (SentencePiece BPE files).

    Every way of cutting a token into two pieces that are both in the vocabulary is a merge; merges are
    ordered best-first by `rank` of the merged token (higher first), ties by the pieces' lengths (longer
    first) and then by the pieces' ids (as transformers' `generate_merges` orders them).
    """
    merges = []
    for token, score in rank.items():
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(tokens: list, merges: list, *, gemma: bool):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    # (transformers' Llama class sets no unk_token on the model; byte fallback covers every character anyway)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>" if gemma else None,
                        dropout=None, byte_fallback=True))
    replace_fallback_fuse = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # no prefix space: spaces become "▁" in the normalizer
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence(replace_fallback_fuse)
    else:  # Llama 2 / Mistral: "▁" prepended to the first word, stripped again when decoding
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*replace_fallback_fuse, decoders.Strip(content=" ", left=1)])
    return tok


def _byte_level(tokens: list, merges: list, pre: Optional[str]):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    table = _bytes_to_unicode()
    alphabet = set(table.values())
    vocab = {(t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    split = SPLIT_REGEX.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (the alphabet of every byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_from_gguf(path: str):
    """`(tokenizers.Tokenizer, fields)` for a GGUF file; fields: its `tokenizer.ggml.*` metadata.

    Raises CheckpointError naming the file when it has no vocabulary or a tokenizer type not handled here.
    """
    from tokenizers import AddedToken

    path = os.fspath(path)
    fields = read_tokenizer_fields(path)
    kind, tokens = fields.get("model"), fields.get("tokens")
    if not tokens:
        raise CheckpointError(f"{path}: the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(fields.get("token_type") or ())
    if types and len(types) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    file_merges = [tuple(m.split(" ", 1)) for m in fields["merges"]] if fields.get("merges") else None

    if kind == "llama":
        gemma = fields["architecture"] in _GEMMA_ARCHS
        if gemma:
            # Gemma files store tokens of two or more spaces as spaces ("  "); the model spells them "▁▁". Their
            # scores do not follow the merge order; the order of the tokens in the file does.
            spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
            rank = {t: -i for i, t in enumerate(spelled)}
        else:
            spelled = list(tokens)
            scores = fields.get("scores")
            if not scores or len(scores) != len(tokens):
                raise CheckpointError(f"{path}: a SentencePiece vocabulary needs tokenizer.ggml.scores")
            rank = dict(zip(spelled, scores))
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = file_merges if file_merges is not None else derive_merges(vocab, rank)
        tok = _sentencepiece(spelled, merges, gemma=gemma)
        specials = ["<unk>", "<s>", "</s>"] if not gemma else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    elif kind == "gpt2":
        if file_merges is None:
            raise CheckpointError(f"{path}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
        tok = _byte_level(tokens, file_merges, fields.get("pre"))
        specials = ["<|endoftext|>"]
    else:
        raise CheckpointError(f"{path}: GGUF tokenizer type {kind!r} is not supported (supported: 'llama', 'gpt2')")

    # The class defaults transformers' tokenizer classes register as special when they are in the vocabulary,
    # then the file's control tokens (special) and user-defined tokens (matched whole, not special).
    in_vocab = tok.get_vocab()
    added = [AddedToken(t, normalized=False, special=True) for t in specials if t in in_vocab]
    byte_alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    added += [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
              if ty == _CONTROL and (byte_alphabet is None or set(t) <= byte_alphabet)]
    tok.add_special_tokens(added)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                    if ty == _USER_DEFINED and t in in_vocab])
    return tok, fields
