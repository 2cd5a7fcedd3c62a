"""GGUF vocabulary -> tokenizer without transformers (`jaxserve.weights.gguf_tokenizer`).

Each tokenizer type is written into a small GGUF the way llama.cpp's converter writes it, from a tokenizer
that is its own reference (a trained sentencepiece model; a trained byte-level BPE), and must encode real
English and code exactly as that tokenizer does. The same files also go through transformers' GGUF
converter (test extra), which must give the same tokenizer. The real Gemma 3 file is checked in
tests/test_tokenizer.py.
"""

from __future__ import annotations

import io
import json

import pytest

from jaxserve.errors import CheckpointError
from jaxserve.weights.tokenizer import Tokenizer, make_random_model_tokenizer
from jaxserve.weights.gguf_tokenizer import derive_merges, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MULTIBYTE = "Grüße, 世界! Emoji: 😀🫠 — naïve café ∑∫ 한국어"


def real_texts(n: int = 40, width: int = 1500) -> list:
    """Slices of CPython's help topics (real English + code), plus edge cases."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:n]
    return [topics[k][:width] for k in keys] + [
        "Hello world", " leading space", "a  b   c\n\n\ttab  ", MULTIBYTE, "", " ", "1234567890 3.14159",
    ]


def training_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def write_tokenizer_gguf(path, arch: str, kind: str, tokens, types, scores=None, merges=None, pre=None, **ids):
    """A tokenizer-only GGUF (no tensors), with the fields llama.cpp's convert_hf_to_gguf.py writes."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("tokenizer.ggml.model", kind)
    if pre is not None:
        w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", list(tokens))
    w.add_array("tokenizer.ggml.token_type", list(types))
    if scores is not None:
        w.add_array("tokenizer.ggml.scores", [float(s) for s in scores])
    if merges is not None:
        w.add_array("tokenizer.ggml.merges", list(merges))
    for k, v in ids.items():
        w.add_uint32(f"tokenizer.ggml.{k}", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A sentencepiece BPE model with byte fallback (Llama 2's settings), and its GGUF."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()), model_writer=model, vocab_size=1200,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, user_defined_symbols=["<tool>"], minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, types = [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else UNUSED if sp.is_unused(i) else USER_DEFINED if tokens[-1] == "<tool>" else NORMAL)
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    path = write_tokenizer_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", "llama", "llama", tokens, types, scores,
                                bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), unknown_token_id=sp.unk_id())
    return sp, path


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory):
    """Our trained byte-level BPE (a Qwen2-shaped vocabulary: specials at the end), and its GGUF."""
    src = make_random_model_tokenizer(2100, bos_id=None, eos_ids=(2099,), pad_id=2098)
    spec = json.loads(src.to_json())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in spec["added_tokens"]}
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    path = write_tokenizer_gguf(tmp_path_factory.mktemp("bpe") / "bpe.gguf", "qwen2", "gpt2", tokens, types,
                                merges=merges, pre="default", eos_token_id=2099, padding_token_id=2098)
    return src, path


# ------------------------------------------------------------------------------------------------ tests
def test_sentencepiece_gguf_encodes_as_sentencepiece(spm_gguf):
    sp, path = spm_gguf
    tok = Tokenizer.from_gguf(path)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (sp.bos_id(), (sp.eos_id(),), sp.get_piece_size())
    fallback = 0
    for text in real_texts():
        want = sp.encode(text)
        got = tok.encode(text, add_bos=False)
        if text.startswith(" "):
            # Known, and transformers' shape: HF's Metaspace adds no dummy "▁" before a text that already
            # starts with one, sentencepiece always does. Everything after it is the same.
            assert want[0] == sp.piece_to_id("\u2581") and got == want[1:], text[:80]
            continue
        assert got == want, text[:80]
        fallback += sum(1 for i in got if sp.is_byte(i))
        assert tok.decode(got) == sp.decode(want)
    assert fallback > 0  # the byte-fallback path was exercised (characters outside the trained vocabulary)
    # control tokens in text stay whole and are skipped when decoding; a user-defined one stays whole and shows
    ids = tok.encode("</s>hi <tool> x", add_bos=False)
    assert ids[0] == sp.eos_id() and sp.piece_to_id("<tool>") in ids
    assert tok.decode(ids) == "hi <tool> x"


def test_byte_level_gguf_encodes_as_source(bpe_gguf):
    src, path = bpe_gguf
    tok = Tokenizer.from_gguf(path)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size) == (None, (2099,), 2098, 2100)
    for text in real_texts() + ["tail<eos>", "<pad><eos>"]:
        assert tok.encode(text, add_bos=False) == src.encode(text, add_bos=False), text[:80]
        assert tok.decode(tok.encode(text, add_bos=False)) == src.decode(src.encode(text, add_bos=False))


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_gguf_tokenizer_equals_transformers(which, spm_gguf, bpe_gguf):
    """transformers' own GGUF converter builds the same tokenizer from these files (post-processor aside:
    jaxserve adds BOS itself)."""
    import os

    from transformers import AutoTokenizer

    path = (spm_gguf if which == "spm" else bpe_gguf)[1]
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
    ours, _ = tokenizer_from_gguf(path)
    want, got = json.loads(hf.backend_tokenizer.to_str()), json.loads(ours.to_str())
    want.pop("post_processor"), got.pop("post_processor")
    if which == "bpe":  # transformers registers GPT-2's "<|endoftext|>" even when the vocabulary lacks it
        want["added_tokens"] = [a for a in want["added_tokens"] if a["content"] != "<|endoftext|>"]
    assert got == want
    for text in real_texts(10):
        assert ours.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False)


def test_derive_merges_order():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    # best-first by the merged token's rank; "abc" can be cut two ways: the longer left piece first
    assert derive_merges(vocab, {"ab": 3.0, "bc": 2.0, "abc": 1.0}) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
    assert derive_merges(vocab, {"abc": 9.0, "ab": 1.0}) == [("ab", "c"), ("a", "bc"), ("a", "b")]
    assert derive_merges(vocab, {"a": 5.0, "ab": 1.0}) == [("a", "b")]  # single characters are no merge


def test_bad_gguf_tokenizers(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        Tokenizer.from_gguf(str(tmp_path / "junk.gguf"))
    p = write_tokenizer_gguf(tmp_path / "t5.gguf", "t5", "t5", ["<pad>", "a"], [CONTROL, NORMAL], [0.0, -1.0])
    with pytest.raises(CheckpointError, match="'t5' is not supported"):
        Tokenizer.from_gguf(p)
    p = write_tokenizer_gguf(tmp_path / "nomerges.gguf", "qwen2", "gpt2", ["a", "b"], [NORMAL, NORMAL])
    with pytest.raises(CheckpointError, match="needs tokenizer.ggml.merges"):
        Tokenizer.from_gguf(p)
    p = write_tokenizer_gguf(tmp_path / "types.gguf", "llama", "llama", ["a", "b"], [NORMAL], [0.0, 0.0])
    with pytest.raises(CheckpointError, match="token_type has 1 entries for 2 tokens"):
        Tokenizer.from_gguf(p)
