"""llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py), for tests that load GGUF files of families the
embedded model doesn't cover.

The converter is not on PyPI by itself; the llama-cpp-python sdist vendors llama.cpp's tree with it. `converter_dir()`
downloads that sdist once (pinned version and sha256, from PyPI's files host, ~77 MB in well under a minute here),
keeps only `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` under `$JAXSERVE_CACHE/llama.cpp-convert-<ver>`,
and returns the directory. `JAXSERVE_LLAMA_CPP_DIR` points at an existing llama.cpp checkout instead.

`convert(hf_dir, out)` runs the converter in a subprocess (it imports its own vendored `gguf`, which must not
replace the installed one in the test process). Run as a script, this file is that subprocess: the tiny test
models have no tokenizer files, so the model class's `set_vocab` writes llama.cpp's "no vocabulary"
(`tokenizer.ggml.model = none`); everything else (tensor names, Q/K permutation, norm offsets, hyperparameter
keys) is the converter's own code.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import urllib.request

VERSION = "0.3.36"
URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
       f"llama_cpp_python-{VERSION}.tar.gz")
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> str:
    """A directory holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ (downloaded once)."""
    own = os.environ.get("JAXSERVE_LLAMA_CPP_DIR")
    if own:
        return own
    from jaxserve.weights.resolve import cache_root

    out = os.path.join(cache_root(), f"llama.cpp-convert-{VERSION}")
    if os.path.isfile(os.path.join(out, "convert_hf_to_gguf.py")):
        return out
    data = urllib.request.urlopen(URL, timeout=120).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{URL}: sha256 {digest}, expected {SHA256}")
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = f"{out}.tmp-{os.getpid()}"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if m.isfile() and rel and rel.startswith(_KEEP):
                m.name = rel
                tar.extract(m, tmp, filter="data")
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first: keep its copy
        if not os.path.isfile(os.path.join(out, "convert_hf_to_gguf.py")):
            raise
    return out


def convert(hf_dir: str, out: str, outtype: str = "f32") -> str:
    """Convert the HF directory `hf_dir` to the GGUF file `out` with llama.cpp's converter; returns `out`."""
    cmd = [sys.executable, os.path.abspath(__file__), converter_dir(), hf_dir, "--outtype", outtype, "--outfile", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return out


def _main(argv):
    llama_dir = argv[0]
    sys.path.insert(0, llama_dir)
    sys.path.insert(1, os.path.join(llama_dir, "gguf-py"))
    import convert_hf_to_gguf as c

    get_model_class = c.get_model_class

    def without_vocab(*a, **k):
        cls = get_model_class(*a, **k)
        cls.set_vocab = lambda self: self._set_vocab_none()
        return cls

    c.get_model_class = without_vocab
    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    c.main()


if __name__ == "__main__":
    _main(sys.argv[1:])
