"""jaxserve: LLM inference on JAX/XLA with a paged KV cache and continuous batching."""

from jaxserve.errors import JaxserveError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import jaxserve` stays cheap for host-only users
    if name in ("LLM",):
        from jaxserve.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from jaxserve import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from jaxserve.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "JaxserveError"]
