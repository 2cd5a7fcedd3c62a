"""Load a llama.cpp GGUF file into jaxserve's stacked parameter layout (see docs/architecture.md).

    config, params, tok_meta = load_gguf("model.gguf")

* The file is read with `gguf.GGUFReader` (memory-mapped) and every tensor is dequantized with
  `gguf.quants.dequantize` to float32. Large tensors are dequantized in row chunks on two threads: numpy
  releases the GIL in the arithmetic, and small chunks keep the temporaries in cache (dequantizing the
  262k x 640 Q8_0 embedding in one call is several times slower than in 16k-row chunks).
* Weights come out `[in, out]` and stacked over layers, float32 numpy.
* RMSNorm weights: llama.cpp's converter stores Gemma norms as `1 + w` (it adds Gemma's offset at convert
  time, so llama.cpp applies the stored weight directly). The stored value is therefore already the
  effective multiplier jaxserve wants, and nothing is added here. Evidence, checked on the real file: every
  stored Gemma norm value minus 1 is exactly representable in bfloat16 (the original checkpoint's dtype)
  while the stored values themselves are not (40-95% per tensor); and transformers' GGUF loader subtracts
  1 from every `norm.weight` of gemma2/gemma3 files before its own `(1 + w)` RMSNorm. Llama norms are plain.
* Llama-architecture files (Llama, Mistral): the converter permutes the rows of Q and K for interleaved
  ("GPT-J") RoPE; we un-permute them to HF's rotate-half layout. Qwen2/Qwen3 and Gemma 2/3 files are not permuted.
* Architectures: `llama` (Llama 2/3.x, Mistral), `qwen2`, `qwen3` (q/k norms), `gemma2` (soft-capping, every
  other layer sliding), `gemma3`, and the mixtures of experts: Mixtral (`llama` with `expert_count`), `qwen2moe`
  (shared expert, no top-k renormalisation), `qwen3moe` (renormalised, q/k norms). What llama.cpp hard-codes rather than records (Gemma's sliding-window period and
  query scale, Gemma 3's local RoPE base) comes from llama.cpp's own rules. tests/test_families_gguf.py converts
  tiny HF models of each family with llama.cpp's convert_hf_to_gguf.py and checks the loaded model against
  transformers.

Errors (missing, truncated, corrupt file, unsupported architecture) raise `CheckpointError` naming the file.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from jaxserve.config import PRESETS, ModelConfig
from jaxserve.errors import CheckpointError

log = logging.getLogger(__name__)

# Rows per dequantization chunk are chosen so one chunk is about this many output elements (float32).
_CHUNK_ELEMENTS = 1 << 22
_THREADS = 2

# Fields that define a model's shape (used to match presets and sanity-check metadata).
_SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim")

# GGUF architectures read here. Mistral files use the "llama" architecture.
_SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "qwen2moe", "qwen3moe")

# Gemma 3 facts the GGUF does not record (llama.cpp hard-codes them); the same values as config._gemma3.
_GEMMA3_DEFAULTS = dict(
    sliding_window=512, global_every=6, rope_local_theta=10_000.0, eos_token_ids=(1, 106), bos_token_id=2
)


class _CorruptFile(ValueError):
    """Internal: a read ran past the end of the file or met an impossible value."""


# --------------------------------------------------------------------------------------------- reader
def _make_reader_class():
    import gguf
    from gguf import GGUFValueType

    class FastGGUFReader(gguf.GGUFReader):
        """`gguf.GGUFReader` with bounds-checked reads and vectorized metadata arrays.

        The stock reader builds one numpy memmap view per array element: many seconds for Gemma 3's 262k-token
        vocabulary. Here scalar arrays (scores, token types) are one typed view, string arrays are walked
        with `struct` and sliced from a plain ndarray view (a fraction of a second), and every read is
        checked against the file size so a truncated or corrupt header raises `_CorruptFile` instead of
        yielding short arrays or looping over a garbage count.

        Difference from the stock reader: for a scalar array field, `field.data` has one index whose part
        holds all the values (`field.contents()` still returns the full list).
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:  # a plain ndarray view: slicing a memmap subclass is far slower
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            itemsize = np.dtype(dtype).itemsize
            end = int(offset) + itemsize * count
            if offset < 0 or count < 0 or end > plain.size:
                raise _CorruptFile(
                    f"a read of {count} x {np.dtype(dtype).name} at byte {offset} runs past the end of the "
                    f"file ({plain.size} bytes)"
                )
            arr = plain[offset:end].view(dtype)
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            try:
                gtype = GGUFValueType(int(raw_type))
            except ValueError:
                raise _CorruptFile(f"unknown metadata value type {int(raw_type)} at byte {orig_offs}") from None
            if gtype != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs
            raw_itype = self._get(offs, np.uint32)
            alen = self._get(offs + 4, np.uint64)
            offs += 12
            n = int(alen[0])
            try:
                itype = GGUFValueType(int(raw_itype[0]))
            except ValueError:
                raise _CorruptFile(f"unknown array element type {int(raw_itype[0])} at byte {orig_offs}") from None
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                values = self._get(offs, nptype, n)
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [gtype, itype]
            if itype != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)  # nested arrays: rare, stock path
            plain = self._plain
            size = plain.size
            if offs + 8 * n > size:
                raise _CorruptFile(f"string array of {n} items at byte {orig_offs} is longer than the file")
            endian = "<" if (sys.byteorder == "little") == (self.byte_order == "I") else ">"
            unpack = struct.Struct(endian + "Q").unpack_from
            buf = memoryview(plain)
            u64 = np.dtype(np.uint64).newbyteorder(self.byte_order)
            parts: list = [raw_itype, alen]
            pos = offs
            for _ in range(n):
                if pos + 8 > size:
                    raise _CorruptFile(f"string array at byte {orig_offs} runs past the end of the file")
                (length,) = unpack(buf, pos)
                end = pos + 8 + length
                if end > size:
                    raise _CorruptFile(f"string of {length} bytes at byte {pos} runs past the end of the file")
                parts.append(plain[pos : pos + 8].view(u64))
                parts.append(plain[pos + 8 : end])
                pos = end
            return pos - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [gtype, itype]

    return FastGGUFReader


_READER_CLASS = None


def open_gguf(path: str):
    """A `gguf.GGUFReader` (fast subclass) for `path`; raises `CheckpointError` naming the file."""
    global _READER_CLASS
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    if _READER_CLASS is None:
        _READER_CLASS = _make_reader_class()
    try:
        reader = _READER_CLASS(path, "r")
    except _CorruptFile as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: {e}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error, MemoryError) as e:
        # ValueError covers the stock reader's bad magic / version / type / alignment checks and bad UTF-8.
        raise CheckpointError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e})") from None
    return reader


def _field_value(field) -> Any:
    """A metadata field as a Python value (str, int, float, bool, or a list for arrays)."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return field.contents()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


# Arrays of this many items or more are not decoded into the metadata dict (the vocabulary, merges, scores):
# only their length is recorded, under "<key>.length". The tokenizer is built from the file by gguf_tokenizer.
_BIG_ARRAY = 4096


def read_metadata(reader) -> dict:
    """Metadata key -> value, with big arrays replaced by their length (`<key>.length`)."""
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            n = int(field.parts[4][0])  # parts: key length, key, value type, element type, count, ...
            meta[key + ".length"] = n
            if n >= _BIG_ARRAY:
                continue
        meta[key] = _field_value(field)
    return meta


def _clean_float(v) -> float:
    """float32 metadata -> the shortest decimal that round-trips (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(v))) if isinstance(v, float) else float(v)


# --------------------------------------------------------------------------------------------- config
def _llama3_rope_factors(head_dim, theta, factor, low, high, orig) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores in `rope_freqs.weight` for Llama 3.x RoPE scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out


def _rope_scaling_from_freqs(path, freqs: np.ndarray, head_dim, theta) -> dict:
    """RoPE scaling from llama.cpp's `rope_freqs` tensor (inverse frequencies are divided by it): a Llama 3.x
    "llama3" scaling when the factors are one of the released ones, else the factors themselves."""
    if freqs.shape != (head_dim // 2,) or not (np.isfinite(freqs).all() and (freqs > 0).all()):
        raise CheckpointError(f"{path}: rope_freqs has shape {freqs.shape} or non-positive values; expected "
                              f"{head_dim // 2} positive factors")
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for orig in (8192, 4096, 2048):
            ref = _llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig)
            if np.allclose(ref, freqs, rtol=1e-4):
                return {
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": orig,
                }
    return {"rope_type": "freq_factors", "factors": [float(f) for f in freqs]}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "gguf-model"


def config_from_metadata(path: str, meta: dict, tensor_shapes: dict,
                         rope_freqs: Optional[np.ndarray] = None) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (`<arch>.*` and `tokenizer.ggml.*` keys) and tensor shapes.

    `tensor_shapes` maps GGUF tensor names to numpy-order shapes ([out, in] for matrices).
    What the GGUF lacks for Gemma 3 (local RoPE base, global-layer period, query scale) comes from the
    Gemma 3 family defaults. If the result has the same shape as a preset and agrees with it everywhere,
    the preset itself is returned (so the embedded Gemma 3 270M gives exactly `PRESETS["gemma3-270m"]`).
    """
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_SUPPORTED_ARCHS)})"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some files; all our architectures use one value
        n_kv = max(n_kv)
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads)
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{path}: GGUF has no token_embd.weight tensor")
    vocab = int(get("vocab_size") or tensor_shapes["token_embd.weight"][0])
    theta = _clean_float(get("rope.freq_base", 10_000.0))
    tok = lambda k: meta.get(f"tokenizer.ggml.{k}")  # noqa: E731
    eos = [tok("eos_token_id")] if tok("eos_token_id") is not None else []
    if tok("eot_token_id") is not None:
        eos.append(tok("eot_token_id"))

    scaling = None
    stype = get("rope.scaling.type")
    if stype == "linear" and get("rope.scaling.factor"):
        scaling = {"rope_type": "linear", "factor": _clean_float(get("rope.scaling.factor"))}
    elif stype not in (None, "none", "linear"):
        raise CheckpointError(f"{path}: RoPE scaling type {stype!r} is not supported")
    if rope_freqs is not None:
        scaling = _rope_scaling_from_freqs(path, rope_freqs, head_dim, theta)

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=head_dim,
        rms_norm_eps=_clean_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        pad_token_id=int(tok("padding_token_id") or 0),
    )
    sizes = {k: common[k] for k in _SHAPE_FIELDS[1:]}
    if min(sizes.values()) <= 0 or common["num_heads"] % common["num_kv_heads"]:
        raise CheckpointError(f"{path}: impossible model sizes in the GGUF metadata {sizes} (corrupt file?)")
    general_name = meta.get("general.name") or os.path.splitext(os.path.basename(path))[0]
    name = _slug(general_name)

    moe = {}
    if get("expert_count"):
        # Mixtral (the llama architecture): experts of feed_forward_length, renormalised top-k. Qwen MoE: experts of
        # expert_feed_forward_length, renormalised in Qwen3-MoE only (llama.cpp's rule for both), Qwen2-MoE's
        # shared expert of expert_shared_feed_forward_length.
        if arch not in ("llama", "qwen2moe", "qwen3moe"):
            raise CheckpointError(f"{path}: mixture-of-experts {arch} GGUF files are not supported")
        moe = dict(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(get("expert_feed_forward_length") or need("feed_forward_length")),
                   norm_topk_prob=arch != "qwen2moe",
                   shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length") or 0))
        if not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
            raise CheckpointError(f"{path}: expert_used_count {moe['num_experts_per_tok']} not in 1..{moe['num_experts']}")
    elif arch in ("qwen2moe", "qwen3moe"):
        raise CheckpointError(f"{path}: {arch} GGUF lacks {arch}.expert_count")
    if arch == "gemma2":
        # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA2): layers 0, 2, 4, ... sliding; queries scaled by head_dim
        # except the 27B (46 layers), scaled by hidden / heads; one RoPE base for both kinds of layer.
        softcap = get("final_logit_softcapping")
        attn_cap = get("attn_logit_softcapping")
        cfg = ModelConfig(
            name=name,
            arch="gemma2",
            hidden_act="gelu_tanh",
            sliding_window=int(get("attention.sliding_window", 4096)),
            global_every=2,
            query_pre_attn_scalar=hidden // n_heads if common["num_layers"] == 46 else head_dim,
            embed_scale=True,
            post_norms=True,
            final_logit_softcap=_clean_float(softcap) if softcap else None,
            attn_logit_softcap=_clean_float(attn_cap) if attn_cap else None,
            bos_token_id=int(tok("bos_token_id")) if tok("bos_token_id") is not None else 2,
            eos_token_ids=tuple(dict.fromkeys([*eos, 1, 107])),  # <eos> and <end_of_turn>, as for Gemma 3
            chat_template="gemma",
            **common,
        )
    elif arch == "gemma3":
        d = _GEMMA3_DEFAULTS
        # The GGUF names <eos> only; Gemma also stops at <end_of_turn>.
        eos_ids = tuple(dict.fromkeys([*eos, *d["eos_token_ids"]]))
        # llama.cpp: the 27B model scales queries by (hidden / heads) ** -0.5, every other size by head_dim.
        qpas = hidden // n_heads if common["num_layers"] == 62 else head_dim
        softcap = get("final_logit_softcapping")
        cfg = ModelConfig(
            name=name,
            arch="gemma3",
            hidden_act="gelu_tanh",
            sliding_window=int(get("attention.sliding_window", d["sliding_window"])),
            global_every=int(get("attention.sliding_window_pattern", d["global_every"])),
            rope_local_theta=d["rope_local_theta"],
            query_pre_attn_scalar=qpas,
            embed_scale=True,
            qk_norm=True,
            post_norms=True,
            final_logit_softcap=_clean_float(softcap) if softcap else None,
            bos_token_id=int(tok("bos_token_id") if tok("bos_token_id") is not None else d["bos_token_id"]),
            eos_token_ids=eos_ids,
            chat_template="gemma",
            **common,
        )
    else:
        is_mistral = "mistral" in general_name.lower()
        if arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
            template = "chatml"
        elif is_mistral or moe:  # Mixtral
            template = "mistral"
        else:
            template = "llama3" if vocab > 100_000 else "llama2"
        cfg = ModelConfig(
            name=name,
            arch="llama",
            hidden_act="silu",
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            qk_norm=arch in ("qwen3", "qwen3moe"),
            **moe,
            sliding_window=int(get("attention.sliding_window")) if get("attention.sliding_window") else None,
            bos_token_id=int(tok("bos_token_id")) if tok("bos_token_id") is not None else 1,
            eos_token_ids=tuple(dict.fromkeys(eos)) or (2,),
            chat_template=template,
            **common,
        )
    return _match_preset(cfg)




def _match_preset(cfg: ModelConfig) -> ModelConfig:
    for preset in PRESETS.values():
        if all(getattr(preset, f) == getattr(cfg, f) for f in _SHAPE_FIELDS):
            diff = {k: (v, getattr(preset, k)) for k, v in cfg.to_dict().items()
                    if k != "name" and getattr(preset, k) != v}
            if not diff:
                return preset
            log.warning("GGUF has the shape of preset %s but differs in %s; keeping the file's values",
                        preset.name, diff)
    return cfg


# --------------------------------------------------------------------------------------------- tensors
def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs) -> HF rotate-half row order.

    `w` is [n_heads * head_dim, ...] (rows = output features). The converter did
    `w.reshape(n_heads, 2, hd // 2, ...).swapaxes(1, 2)`; this is its inverse.
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequant_rows(t, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a tensor as float32 [rows, in]."""
    from gguf.quants import dequantize

    data = t.data.reshape(-1, t.data.shape[-1])
    with np.errstate(invalid="ignore", over="ignore"):  # corrupt scales: reported by the isfinite check
        return np.asarray(dequantize(data[r0:r1], t.tensor_type), dtype=np.float32)


def _row_chunks(t, a: int, b: int) -> list:
    """Rows [a, b) of tensor `t` in chunks of about _CHUNK_ELEMENTS output elements."""
    rows = int(np.prod(t.data.shape[:-1]))
    row_elems = max(1, int(t.n_elements) // max(rows, 1))
    step = max(1, _CHUNK_ELEMENTS // row_elems)
    return [(r, min(r + step, b)) for r in range(a, b, step)]


def load_gguf(path) -> tuple:
    """Read a GGUF file into `(ModelConfig, params, tokenizer_metadata)`.

    params: the nested dict of docs/architecture.md, float32 numpy, matrices `[in, out]`, per-layer
    tensors stacked on a leading `num_layers` axis.
    tokenizer_metadata: dict with "gguf_path", "architecture", and the file's `tokenizer.*` metadata
    (ids, flags, chat template; the vocabulary itself is left in the file for `Tokenizer.from_gguf`).

    Raises CheckpointError (message names the file) if the file is missing, truncated, corrupt, of an
    unsupported architecture or quantization type, or lacks a tensor the architecture needs.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    try:
        return _load(path, reader)
    except CheckpointError:
        raise
    except (_CorruptFile, ValueError, KeyError, IndexError, TypeError, struct.error, OverflowError,
            ZeroDivisionError, MemoryError, AssertionError) as e:
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    except OSError as e:  # e.g. SIGBUS-free short reads surface as OSError on some filesystems
        raise CheckpointError(f"{path}: cannot read file ({e})") from None


def _load(path: str, reader) -> tuple:
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    file_size = os.path.getsize(path)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:  # truncation check before touching data: every tensor must lie inside the file
        if t.data_offset + t.n_bytes > file_size:
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes} "
                f"but the file has {file_size}"
            )
        plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        if t.tensor_type not in plain and t.tensor_type not in _type_traits:
            raise CheckpointError(f"{path}: tensor {t.name} has unsupported ggml type {t.tensor_type.name}")
    meta = read_metadata(reader)
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}

    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        rope_freqs = _dequant_rows(tensors["rope_freqs.weight"], 0, 1).reshape(-1).astype(np.float64)
    cfg = config_from_metadata(path, meta, shapes, rope_freqs)
    permute_qk = meta["general.architecture"] == "llama"

    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    # jaxserve name -> (GGUF name pattern, numpy shape of the GGUF tensor, is matrix)
    layer_spec = {
        "attn_norm": ("blk.{}.attn_norm.weight", (D,)),
        "wq": ("blk.{}.attn_q.weight", (cfg.q_size, D)),
        "wk": ("blk.{}.attn_k.weight", (cfg.kv_size, D)),
        "wv": ("blk.{}.attn_v.weight", (cfg.kv_size, D)),
        "wo": ("blk.{}.attn_output.weight", (D, cfg.q_size)),
        "mlp_norm": ("blk.{}.ffn_norm.weight", (D,)),
        "w_gate": ("blk.{}.ffn_gate.weight", (F, D)),
        "w_up": ("blk.{}.ffn_up.weight", (F, D)),
        "w_down": ("blk.{}.ffn_down.weight", (D, F)),
    }
    if cfg.attention_bias:
        layer_spec |= {
            "bq": ("blk.{}.attn_q.bias", (cfg.q_size,)),
            "bk": ("blk.{}.attn_k.bias", (cfg.kv_size,)),
            "bv": ("blk.{}.attn_v.bias", (cfg.kv_size,)),
        }
    if cfg.qk_norm:
        layer_spec |= {
            "q_norm": ("blk.{}.attn_q_norm.weight", (cfg.head_dim,)),
            "k_norm": ("blk.{}.attn_k_norm.weight", (cfg.head_dim,)),
        }
    if cfg.post_norms:
        layer_spec |= {
            "post_attn_norm": ("blk.{}.post_attention_norm.weight", (D,)),
            "post_mlp_norm": ("blk.{}.post_ffw_norm.weight", (D,)),
        }
    if cfg.is_moe:  # models/transformer.py's moe_mlp layout; expert stacks are [E, out, in] in the file
        E, Fe, Fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        del layer_spec["w_gate"], layer_spec["w_up"], layer_spec["w_down"]
        layer_spec |= {
            "router": ("blk.{}.ffn_gate_inp.weight", (E, D)),
            "experts_gate": ("blk.{}.ffn_gate_exps.weight", (E, Fe, D)),
            "experts_up": ("blk.{}.ffn_up_exps.weight", (E, Fe, D)),
            "experts_down": ("blk.{}.ffn_down_exps.weight", (E, D, Fe)),
        }
        if Fs:
            layer_spec |= {
                "shared_w_gate": ("blk.{}.ffn_gate_shexp.weight", (Fs, D)),
                "shared_w_up": ("blk.{}.ffn_up_shexp.weight", (Fs, D)),
                "shared_w_down": ("blk.{}.ffn_down_shexp.weight", (D, Fs)),
                "shared_expert_gate": ("blk.{}.ffn_gate_inp_shexp.weight", (1, D)),
            }

    def tensor(name, shape):
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: GGUF lacks tensor {name} needed by {cfg.arch} ({cfg.name})")
        if shapes[name] != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {shapes[name]}, expected {tuple(shape)}")
        return t

    # Validate every tensor before allocating anything: a corrupt size in the metadata must not turn into a
    # 100 GB allocation. Once all shapes agree with the tensors in the file, the outputs are bounded by it.
    tensor("token_embd.weight", (V, D))
    tensor("output_norm.weight", (D,))
    if not cfg.tie_word_embeddings:
        tensor("output.weight", (V, D))
    for pattern, shape in layer_spec.values():
        for i in range(L):
            tensor(pattern.format(i), shape)

    params: dict = {"layers": {}}
    # Work items: (tensor, first row, end row, output view, transpose?, heads to un-permute or None, row of the
    # tensor that is row 0 of the output). GGUF rows are output features; each item writes its rows into a slice
    # of a preallocated output.
    jobs: list = []

    def add(t, out, transpose: bool, unpermute_heads: Optional[int] = None, rows: Optional[tuple] = None):
        """Queue tensor `t` (or its rows [a, b)) for `out` ([rows, in] as stored, or [in, rows] with `transpose`)."""
        if unpermute_heads is not None:  # whole tensor at once: the permutation mixes rows within a head
            jobs.append((t, 0, int(np.prod(t.data.shape[:-1])), out, transpose, unpermute_heads, 0))
            return
        a, b = rows or (0, int(np.prod(t.data.shape[:-1])))
        for r0, r1 in _row_chunks(t, a, b):
            jobs.append((t, r0, r1, out, transpose, None, a))

    params["embed"] = np.empty((V, D), np.float32)
    add(tensor("token_embd.weight", (V, D)), params["embed"], transpose=False)
    params["final_norm"] = np.empty((D,), np.float32)
    add(tensor("output_norm.weight", (D,)), params["final_norm"][None], transpose=False)
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.empty((D, V), np.float32)
        add(tensor("output.weight", (V, D)), params["lm_head"], transpose=True)

    for key, (pattern, shape) in layer_spec.items():
        if len(shape) == 3:  # an expert stack [E, out, in] -> [L, E, in, out], one expert's rows at a time
            dest = params["layers"][key] = np.empty((L, shape[0], shape[2], shape[1]), np.float32)
            for i in range(L):
                t = tensor(pattern.format(i), shape)
                for j in range(shape[0]):
                    add(t, dest[i, j], transpose=True, rows=(j * shape[1], (j + 1) * shape[1]))
            continue
        is_matrix = len(shape) == 2
        dest = params["layers"][key] = np.empty((L, shape[1], shape[0]) if is_matrix else (L, shape[0]), np.float32)
        heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads, "bq": cfg.num_heads, "bk": cfg.num_kv_heads}.get(key)
        for i in range(L):
            # vectors are dequantized as one row [1, n]: write them into a [1, n] view
            add(tensor(pattern.format(i), shape), dest[i] if is_matrix else dest[i][None], transpose=is_matrix,
                unpermute_heads=heads if permute_qk else None)

    def run(job):
        t, r0, r1, out, transpose, heads, base = job
        x = _dequant_rows(t, r0, r1)
        if not np.isfinite(x).all():  # a flipped scale byte shows up as inf/nan
            raise CheckpointError(f"{path}: tensor {t.name} holds non-finite values (corrupt data)")
        if heads is not None:
            x = _unpermute_rows(x if transpose else x.reshape(-1), heads).reshape(x.shape)
        if transpose:
            out[..., r0 - base:r1 - base] = x.T
        else:
            out[r0 - base:r1 - base] = x

    # Biggest first (in bytes read), so the two threads finish together.
    jobs.sort(key=lambda j: -(j[2] - j[1]) * j[0].data.shape[-1])
    with ThreadPoolExecutor(_THREADS) as pool:
        for _ in pool.map(run, jobs):
            pass

    tok_meta = {k[len("tokenizer."):]: v for k, v in meta.items() if k.startswith("tokenizer.")}
    tok_meta["gguf_path"] = os.path.abspath(path)
    tok_meta["architecture"] = meta["general.architecture"]
    return cfg, params, tok_meta
