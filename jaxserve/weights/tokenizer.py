"""Tokenizer: a thin wrapper over a HF fast tokenizer (`tokenizers.Tokenizer`), chat templates, and
incremental detokenization for streaming.

Host-side only: never imports JAX, transformers or torch. A saved `tokenizer.json` loads with the `tokenizers`
package; a GGUF file's vocabulary is read with `gguf` and built into the same kind of tokenizer
(`Tokenizer.from_gguf`, `jaxserve.weights.gguf_tokenizer`).

BOS policy: `encode(text, add_bos=True)` prepends BOS unless the text already starts with it, and chat
templates never write BOS themselves, so a templated prompt gets exactly one BOS.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence, Union

from jaxserve.errors import CheckpointError, InvalidConfigError, InvalidPromptError

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


# ----------------------------------------------------------------------------------------- chat templates
def _text(content, strip: bool = False) -> str:
    """Message content as text: a string, or OpenAI-style parts `[{"type": "text", "text": ...}, ...]`.

    With `strip`, each part is stripped (as Gemma's and Llama's templates `trim` each text item).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip() if strip else content
    parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
    return "".join(p.strip() if strip else p for p in parts)


def _split_system(messages: Sequence[dict]) -> tuple:
    if messages and messages[0].get("role") == "system":
        return _text(messages[0].get("content")), list(messages[1:])
    return None, list(messages)


def _gemma(messages, add_generation_prompt, bos_token, eos_token) -> str:
    """Gemma 2/3: no system role; the system text is prefixed to the first user turn; content is trimmed."""
    system, rest = _split_system(messages)
    out = []
    for i, m in enumerate(rest):
        role = "model" if m["role"] == "assistant" else m["role"]
        prefix = system + "\n\n" if (i == 0 and system is not None) else ""
        out.append(f"<start_of_turn>{role}\n{prefix}{_text(m.get('content'), strip=True)}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _llama3(messages, add_generation_prompt, bos_token, eos_token) -> str:
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_text(m.get('content'), strip=True)}<|eot_id|>"
           for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _llama2(messages, add_generation_prompt, bos_token, eos_token) -> str:
    """`[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s><s>[INST] ...`; generation prompt is implicit."""
    system, rest = _split_system(messages)
    out = []
    for i, m in enumerate(rest):
        content = _text(m.get("content"))
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out.append(("" if i == 0 else bos_token) + f"[INST] {content.strip()} [/INST]")
        else:
            out.append(f" {content.strip()} {eos_token}")
    return "".join(out)


def _mistral(messages, add_generation_prompt, bos_token, eos_token) -> str:
    """Mistral instruct v0.1-v0.3: `[INST] user [/INST]answer</s>[INST] ...`; system folded into first user turn."""
    system, rest = _split_system(messages)
    out = []
    for i, m in enumerate(rest):
        content = _text(m.get("content"), strip=True)
        if m["role"] == "user":
            if i == 0 and system is not None:
                content = f"{system}\n\n{content}"
            out.append(f"[INST] {content} [/INST]")
        else:
            out.append(f"{content}{eos_token}")
    return "".join(out)


def _chatml(messages, add_generation_prompt, bos_token, eos_token) -> str:
    out = [f"<|im_start|>{m['role']}\n{_text(m.get('content'))}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# name -> callable(messages, add_generation_prompt, bos_token, eos_token) -> str, or a jinja2 template string
# (rendered with `messages`, `add_generation_prompt`, `bos_token`, `eos_token`). Callables never emit the
# leading BOS (encode adds it); a jinja template may, and encode then does not add a second one.
CHAT_TEMPLATES: dict = {
    "gemma": _gemma,
    "llama3": _llama3,
    "llama2": _llama2,
    "mistral": _mistral,
    "chatml": _chatml,
}


def _render_jinja(template: str, messages, add_generation_prompt, bos_token, eos_token, tools=None) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise InvalidPromptError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
        tools=tools,
    )


# ----------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template.

    Args:
        backend: the HF fast tokenizer (its own post-processor is not used: BOS is handled here).
        bos_id: id prepended by `encode(add_bos=True)`; None for models without BOS.
        eos_ids: ids that end generation.
        pad_id: padding id.
        chat_template: a key of `CHAT_TEMPLATES` or a jinja2 template string; None = no template.
    """

    def __init__(self, backend, *, bos_id: Optional[int], eos_ids: Sequence[int], pad_id: int = 0,
                 chat_template: Optional[str] = None):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = pad_id
        self.chat_template = chat_template

    @property
    def bos_token(self) -> str:
        """BOS as text ("" if the model has none)."""
        return (self._tok.id_to_token(self.bos_id) or "") if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        """The first EOS id as text."""
        return (self._tok.id_to_token(self.eos_ids[0]) or "") if self.eos_ids else ""

    # ---- construction / persistence
    @classmethod
    def from_json(cls, tokenizer_json: str, **meta) -> "Tokenizer":
        """From the text of a `tokenizer.json` and meta keywords (bos_id, eos_ids, pad_id, chat_template)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(tokenizer_json), **_meta_kwargs(meta))

    @classmethod
    def from_file(cls, path: str, **meta) -> "Tokenizer":
        """From a `tokenizer.json` file. Raises CheckpointError naming the file if it is missing/corrupt."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception for both missing and malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        return cls(backend, **_meta_kwargs(meta))

    @classmethod
    def from_dir(cls, directory: str, **defaults) -> "Tokenizer":
        """From `tokenizer.json` + optional `tokenizer_meta.json` in `directory`; `defaults` fill missing meta.

        The model's own chat template (an HF directory's `chat_template.jinja` or `tokenizer_config.json`
        "chat_template") takes precedence over the family default in `defaults`."""
        meta = dict(defaults)
        own = hf_chat_template(directory)
        if own is not None:
            meta["chat_template"] = own
        meta_path = os.path.join(directory, META_FILE)
        if os.path.exists(meta_path):
            try:
                with open(meta_path) as f:
                    meta.update(json.load(f))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{meta_path}: cannot read tokenizer metadata ({e})") from None
        return cls.from_file(os.path.join(directory, TOKENIZER_FILE), **meta)

    @classmethod
    def from_gguf(cls, gguf_path: str, *, bos_id=None, eos_ids=None, pad_id=None, chat_template=None) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes (`jaxserve.weights.gguf_tokenizer`; seconds for Gemma 3).

        Ids not given are taken from the file (`tokenizer.ggml.*`), the chat template from
        `tokenizer.chat_template`. Save the result with `save()` so later starts load `tokenizer.json` directly.
        """
        from jaxserve.weights.gguf_tokenizer import tokenizer_from_gguf

        gguf_path = os.path.abspath(os.fspath(gguf_path))
        if not os.path.isfile(gguf_path):
            raise CheckpointError(f"GGUF file not found: {gguf_path}")
        backend, fields = tokenizer_from_gguf(gguf_path)
        file_eos = fields.get("eos_token_id")
        return cls(
            backend,
            bos_id=bos_id if bos_id is not None else fields.get("bos_token_id"),
            eos_ids=eos_ids if eos_ids is not None else ([file_eos] if file_eos is not None else []),
            pad_id=pad_id if pad_id is not None else (fields.get("padding_token_id") or 0),
            chat_template=fields.get("chat_template") or chat_template,  # the file's own template first
        )

    def to_json(self) -> str:
        """The `tokenizer.json` text of the backend."""
        return self._tok.to_str()

    def meta(self) -> dict:
        """What `tokenizer.json` does not hold: special ids and the chat template."""
        return {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
                "chat_template": self.chat_template}

    def save(self, directory: str) -> None:
        """Write `tokenizer.json` and `tokenizer_meta.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(self.meta(), f, indent=1)

    # ---- core API
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        return self._tok

    def encode(self, text: str, add_bos: bool = True) -> list:
        """Token ids of `text`; special-token strings in the text (e.g. `<start_of_turn>`) map to their ids.

        With `add_bos`, BOS is prepended unless the text already begins with it (no double BOS).
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            template: Optional[str] = None, tools: Optional[list] = None) -> str:
        """Render a conversation (`[{"role": "user"|"assistant"|"system", "content": str}, ...]`) as text.

        `template` overrides the tokenizer's own (a `CHAT_TEMPLATES` key or a jinja2 string). `tools` (OpenAI
        tool objects) are passed to a jinja template (`chat_template_source` tells whether it reads them).
        """
        name = template or self.chat_template
        if name is None:
            raise InvalidPromptError("this model has no chat template; pass a plain prompt or template=...")
        if not messages:
            raise InvalidPromptError("chat conversation is empty")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidPromptError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        fn: Union[str, Callable] = CHAT_TEMPLATES.get(name, name)
        if callable(fn):
            return fn(messages, add_generation_prompt, self.bos_token, self.eos_token)
        if name not in CHAT_TEMPLATES and "{" not in name:
            raise InvalidConfigError(f"unknown chat template {name!r}; known: {', '.join(CHAT_TEMPLATES)}")
        return _render_jinja(fn, messages, add_generation_prompt, self.bos_token, self.eos_token, tools)

    @property
    def chat_template_source(self):
        """The chat template as a jinja string, or None when it is a built-in family template (or absent)."""
        name = self.chat_template
        return name if isinstance(name, str) and name not in CHAT_TEMPLATES and "{" in name else None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids})"


def hf_chat_template(directory: str) -> Optional[str]:
    """The chat template an HF model directory ships: `chat_template.jinja` (transformers >= 4.50), else the
    "chat_template" of `tokenizer_config.json` (a string, or a list of named templates: "default"). None if
    neither has one."""
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            t = json.load(f).get("chat_template")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read tokenizer config ({e})") from None
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def _meta_kwargs(meta: dict) -> dict:
    return {
        "bos_id": meta.get("bos_id"),
        "eos_ids": tuple(meta.get("eos_ids") or ()),
        "pad_id": meta.get("pad_id") if meta.get("pad_id") is not None else 0,
        "chat_template": meta.get("chat_template"),
    }


# ------------------------------------------------------------------------------------- random-model tokenizer
# Tokens trained on at most this many BPE merges; the rest of a large vocabulary is filled with unused tokens.
_MAX_TRAINED_VOCAB = 2048


def _training_text() -> str:
    """A fixed English/Python corpus shipped with CPython (the `help()` topics), ~460k characters."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def make_random_model_tokenizer(vocab_size: int, *, bos_id: Optional[int], eos_ids: Sequence[int], pad_id: int = 0,
                                chat_template: Optional[str] = None) -> Tokenizer:
    """A small real byte-level BPE tokenizer for random-weight models, trained in memory (deterministic).

    Exactly `vocab_size` ids; `<pad>`, `<bos>`, `<eos>` sit at the given ids. Byte-level, so any text
    encodes and decodes losslessly.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials: dict = {}
    for i, e in enumerate(eos_ids):
        specials.setdefault(int(e), "<eos>" if i == 0 else f"<eos{i}>")
    if bos_id is not None:
        specials.setdefault(int(bos_id), "<bos>")
    specials.setdefault(int(pad_id), "<pad>")
    if max(specials) >= vocab_size:
        raise InvalidConfigError(f"special token id {max(specials)} does not fit a vocabulary of {vocab_size}")
    # Ids below the first ordinary token are reserved for specials (and fillers between them); ids far up
    # (e.g. Llama 3's 128000) are placed after training.
    low = [i for i in specials if i < 256]
    n_low = max(low) + 1 if low else 0
    low_names = [specials.get(i, f"<unused_low{i}>") for i in range(n_low)]
    n_train = min(vocab_size - (len(specials) - len(low)), _MAX_TRAINED_VOCAB)
    if n_train < n_low + 256:
        raise InvalidConfigError(
            f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs >= {n_low + 256})"
        )

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_train, special_tokens=low_names, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_training_text()], trainer=trainer)

    # Fill up to vocab_size: unused plain vocab entries (never produced: no merge yields them), with the
    # high special ids placed at their exact positions. Done on the JSON because that is where ids are explicit.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    added = {a["id"]: a for a in spec["added_tokens"]}
    next_id = len(vocab)
    for i in range(next_id, vocab_size):
        name = specials.get(i, f"<unused{i}>")
        vocab[name] = i
        if i in specials:
            added[i] = {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True}
    for i, a in added.items():  # the low fillers are special too, so decode(skip_special_tokens) drops them
        a["special"] = True
    spec["added_tokens"] = [added[i] for i in sorted(added)]
    backend = HFTokenizer.from_str(json.dumps(spec))
    if backend.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"random tokenizer has {backend.get_vocab_size()} ids, wanted {vocab_size}")
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, chat_template=chat_template)


def tokenizer_for_config(config) -> Tokenizer:
    """The random-model tokenizer matching a ModelConfig's vocabulary and special ids."""
    return make_random_model_tokenizer(
        config.vocab_size, bos_id=config.bos_token_id, eos_ids=config.eos_token_ids, pad_id=config.pad_token_id,
        chat_template=config.chat_template,
    )


# ------------------------------------------------------------------------------- incremental detokenizer
# Tokens of context decoded before the first new token: enough for a SentencePiece word boundary.
_INITIAL_PREFIX_TOKENS = 5


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas (vLLM's prefix_offset/read_offset scheme).

    Each step decodes a short window `ids[prefix_offset:]` and the already-emitted part
    `ids[prefix_offset:read_offset]`; the delta is the difference. Decoding with a prefix keeps
    SentencePiece's leading space ("▁world" -> " world") and byte-level merges right. While the window's
    text ends in U+FFFD (an incomplete UTF-8 sequence from byte-fallback tokens), nothing is emitted, so a
    multi-byte character is never split. `flush()` emits whatever is held back at the end of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = [int(i) for i in prompt_ids]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - _INITIAL_PREFIX_TOKENS, 0)
        self.text = ""  # everything emitted so far

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or an incomplete character: wait for more tokens
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """End of stream: return any held-back text (an incomplete character decodes as U+FFFD)."""
        if self.read_offset >= len(self.ids):
            return ""
        return self._delta(final=True)
