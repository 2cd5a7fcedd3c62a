"""Tokenizer: random-model tokenizers, chat templates, BOS handling, incremental detokenization, and the
real Gemma 3 tokenizer converted from the GGUF (slow)."""

from __future__ import annotations

import pytest

from jaxserve.config import PRESETS
from jaxserve.errors import CheckpointError, InvalidPromptError
from jaxserve.weights.tokenizer import CHAT_TEMPLATES, IncrementalDetokenizer, Tokenizer, tokenizer_for_config

MULTIBYTE = "Grüße, 世界! Emoji: 😀🫠👩‍👩‍👧 — naïve café ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 한국어 العربية"


@pytest.fixture(scope="module")
def tiny_tok():
    return tokenizer_for_config(PRESETS["tiny-llama"])


# ------------------------------------------------------------------------------------------ random models
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_random_tokenizer_matches_config(name):
    cfg = PRESETS[name]
    tok = tokenizer_for_config(cfg)
    assert tok.vocab_size == cfg.vocab_size
    assert tok.bos_id == cfg.bos_token_id and tok.eos_ids == cfg.eos_token_ids and tok.pad_id == cfg.pad_token_id
    assert tok.id_to_token(cfg.bos_token_id) == "<bos>" and tok.id_to_token(cfg.eos_token_ids[0]) == "<eos>"
    assert tok.id_to_token(cfg.pad_token_id) == "<pad>"
    for text in ["Hello world", "def f(x):\n    return x  # comment", MULTIBYTE, "  leading and trailing  ", ""]:
        ids = tok.encode(text)
        assert ids[0] == cfg.bos_token_id
        assert all(0 <= i < cfg.vocab_size for i in ids)
        assert tok.decode(ids) == text  # byte-level: lossless, BOS skipped
    # trained merges actually compress English (not a bytes-only vocabulary)
    assert len(tok.encode("the function returns the value of the expression", add_bos=False)) < 20


def test_random_tokenizer_deterministic_and_large_vocab():
    a = tokenizer_for_config(PRESETS["tiny-gemma3"]).to_json()
    b = tokenizer_for_config(PRESETS["tiny-gemma3"]).to_json()
    assert a == b
    big = tokenizer_for_config(PRESETS["llama3-8b"])  # special ids far above the trained vocabulary
    assert big.vocab_size == 128_256
    assert big.id_to_token(128_000) == "<bos>" and big.id_to_token(128_009) == "<eos1>"
    ids = big.encode("Hello there")
    assert ids[0] == 128_000 and max(ids[1:]) < 4096 and big.decode(ids) == "Hello there"


def test_bos_added_once(tiny_tok):
    ids = tiny_tok.encode("hi")
    assert ids.count(1) == 1 and ids[0] == 1
    assert tiny_tok.encode("<bos>hi") == ids  # text that already starts with BOS: not doubled
    assert tiny_tok.encode("hi", add_bos=False) == ids[1:]
    assert tiny_tok.encode("", add_bos=True) == [1]
    # special-token text inside a prompt maps to its id
    assert tiny_tok.encode("a<eos>b", add_bos=False)[1] == 2
    assert tiny_tok.decode([1, *ids[1:], 2]) == "hi"
    assert tiny_tok.decode([1, *ids[1:], 2], skip_special_tokens=False) == "<bos>hi<eos>"


def test_save_load_round_trip(tmp_path, tiny_tok):
    tiny_tok.save(str(tmp_path))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.chat_template) == (1, (2,), 0, "llama3")
    assert tok.encode(MULTIBYTE) == tiny_tok.encode(MULTIBYTE)
    with pytest.raises(CheckpointError) as e:
        Tokenizer.from_file(str(tmp_path / "missing.json"))
    assert "missing.json" in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json"):
        Tokenizer.from_file(str(tmp_path / "bad.json"))


def test_hf_directory_chat_template_beats_the_family_default(tmp_path, tiny_tok):
    """An HF directory's own template (tokenizer_config.json, or chat_template.jinja first) is used over the
    family default the config names."""
    import json

    (tmp_path / "tokenizer.json").write_text(tiny_tok.to_json())
    assert Tokenizer.from_dir(str(tmp_path), chat_template="llama3").chat_template == "llama3"  # none shipped
    own = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                   "template": "x"},
                                                                                  {"name": "default",
                                                                                   "template": own}]}))
    tok = Tokenizer.from_dir(str(tmp_path), chat_template="llama3")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[a]"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1].content }}!")
    assert Tokenizer.from_dir(str(tmp_path), chat_template="llama3").apply_chat_template(
        [{"role": "user", "content": "hi"}]) == "hi!"


# ------------------------------------------------------------------------------------------ chat templates
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hi there \n"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a color."},
]


def test_gemma_template_exact(tiny_tok):
    text = tiny_tok.apply_chat_template(CONV, template="gemma")
    assert text == (
        "<start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # the one-turn case as Gemma's own template renders it (minus the leading <bos>, which encode adds)
    one = tiny_tok.apply_chat_template([{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Hello"}],
                                       template="gemma")
    assert one == "<start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n<start_of_turn>model\n"
    no_gen = tiny_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False, template="gemma")
    assert no_gen == "<start_of_turn>user\nHi<end_of_turn>\n"
    parts = tiny_tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b "}]}], template="gemma")
    assert parts == "<start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\n"


def test_other_templates_exact(tiny_tok):
    assert tiny_tok.apply_chat_template(CONV, template="llama3") == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tiny_tok.apply_chat_template(CONV, template="chatml") == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n  Hi there \n<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    )
    # Llama 2's template strips the user text only after prefixing the <<SYS>> block (leading spaces stay)
    assert tiny_tok.apply_chat_template(CONV, template="llama2") == (
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n  Hi there [/INST] Hello! <eos><bos>[INST] Name a color. [/INST]"
    )
    assert tiny_tok.apply_chat_template(CONV, template="mistral") == (
        "[INST] You are terse.\n\nHi there [/INST]Hello!<eos>[INST] Name a color. [/INST]"
    )
    assert set(CHAT_TEMPLATES) >= {"gemma", "llama3", "llama2", "chatml", "mistral"}


def test_jinja_template_and_single_bos(tiny_tok):
    jinja = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
            "{% if add_generation_prompt %}<assistant>{% endif %}"
    text = tiny_tok.apply_chat_template([{"role": "user", "content": "yo"}], template=jinja)
    assert text == "<bos><user>yo<assistant>"
    ids = tiny_tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1  # the template wrote BOS; encode did not add another
    with pytest.raises(InvalidPromptError):
        tiny_tok.apply_chat_template([])


# ---------------------------------------------------------------------------------- incremental detokenizer
def stream(tok, prompt_ids, gen_ids, skip_special_tokens=True):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    deltas = [d.add(t) for t in gen_ids]
    deltas.append(d.flush())
    return deltas


def test_detokenizer_multibyte_byte_level(tiny_tok):
    prompt = tiny_tok.encode("Say: ")
    gen = tiny_tok.encode(MULTIBYTE, add_bos=False)
    # the test is not vacuous: some characters are split across byte-level tokens
    assert any("\ufffd" in tiny_tok.decode([t]) for t in gen)
    deltas = stream(tiny_tok, prompt, gen)
    assert "".join(deltas) == MULTIBYTE == tiny_tok.decode(gen)
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    assert sum(1 for d in deltas if d) > 10  # and it does stream


def test_detokenizer_sentencepiece_leading_space():
    """With a Metaspace decoder a lone "▁world" decodes to "world"; the prefix window keeps the space."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["Hello world, the wide world says hello to the world"] * 20, vocab_size=120,
                           special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False)
    tok = Tokenizer(sp._tokenizer, bos_id=1, eos_ids=(2,))
    prompt = tok.encode("Hello")
    gen = tok.encode(" world says hello", add_bos=False) + [2]
    naive = "".join(tok.decode([t]) for t in gen)
    deltas = stream(tok, prompt, gen)
    full = tok.decode(prompt + gen)
    assert "".join(deltas) == full[len(tok.decode(prompt)):] == " world says hello"
    assert naive != " world says hello"  # per-token decoding would lose the spaces
    assert stream(tok, prompt, gen, skip_special_tokens=False)[-2:] == ["<eos>", ""]


def test_detokenizer_flush_emits_incomplete_tail(tiny_tok):
    gen = tiny_tok.encode("😀", add_bos=False)
    assert len(gen) > 1
    d = IncrementalDetokenizer(tiny_tok, [1], True)
    assert d.add(gen[0]) == ""  # a 4-byte character is held back
    assert d.flush() == "\ufffd"  # at the end of the stream, it is surfaced as a replacement character
    assert d.flush() == ""


# -------------------------------------------------------------------------------------- real Gemma (slow)
@pytest.fixture(scope="module")
def gemma_tok():
    from jaxserve.weights.resolve import resolve_model

    return resolve_model("gemma3-270m").tokenizer


@pytest.mark.slow
def test_gemma_tokenizer_known_ids(gemma_tok):
    assert (gemma_tok.bos_id, gemma_tok.eos_ids, gemma_tok.vocab_size) == (2, (1, 106), 262_144)
    assert gemma_tok.encode("Hello world") == [2, 9259, 1902]
    assert gemma_tok.encode("The quick brown fox jumps over the lazy dog.") == \
        [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]
    chat = gemma_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = gemma_tok.encode(chat)
    assert ids == [2, 105, 2364, 107, 2202, 106, 107, 105, 4368, 107]  # <bos><start_of_turn>user\nhi<end_of_turn>\n...
    assert ids.count(2) == 1
    assert gemma_tok.decode(ids) == "user\nhi\nmodel\n"  # control tokens skipped
    assert gemma_tok.decode(ids, skip_special_tokens=False) == "<bos>" + chat


@pytest.mark.slow
def test_gemma_tokenizer_matches_transformers_gguf(gemma_tok):
    """The tokenizer built without transformers (jaxserve.weights.gguf_tokenizer) is the one transformers' own
    GGUF converter builds (AutoTokenizer.from_pretrained(..., gguf_file=...); test extra, pinned): the same
    tokenizer.json except the post-processor (jaxserve adds BOS itself), and the same ids on real text."""
    import json
    import os

    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from jaxserve.weights.resolve import embedded_gguf_path

    path = embedded_gguf_path()
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
    built = Tokenizer.from_gguf(path)
    want, got = json.loads(hf.backend_tokenizer.to_str()), json.loads(built.to_json())
    want.pop("post_processor"), got.pop("post_processor")
    assert got == want
    assert (built.bos_id, built.eos_ids[0], built.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    texts = ["Hello world", " leading space", "a  b   c\n\n\ttab", MULTIBYTE, "<start_of_turn>user\nhi<end_of_turn>\n",
             "def f(x):\n    return x ** 2  # square", "1234567890 3.14159"]
    texts += [topics[k][:2000] for k in sorted(topics)[::8]]
    for t in texts:
        assert gemma_tok.encode(t) == built.encode(t) == hf.encode(t), t[:80]  # hf adds <bos> (add_bos_token)
        assert gemma_tok.decode(gemma_tok.encode(t)) == hf.decode(hf.encode(t), skip_special_tokens=True)


@pytest.mark.slow
def test_gemma_detokenizer_byte_fallback(gemma_tok):
    text = "𝔘𝔫𝔦 héllo 😀 世界 🫠🧌 龘靐 done."
    gen = gemma_tok.encode(text, add_bos=False) + [106]
    assert any(gemma_tok.id_to_token(t).startswith("<0x") for t in gen)  # byte-fallback pieces present
    prompt = gemma_tok.encode(gemma_tok.apply_chat_template([{"role": "user", "content": "Write it."}]))
    deltas = stream(gemma_tok, prompt, gen)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # starting mid-word after the prompt keeps SentencePiece's space
    assert "".join(stream(gemma_tok, gemma_tok.encode("Hello"), gemma_tok.encode(" world", add_bos=False))) == " world"
