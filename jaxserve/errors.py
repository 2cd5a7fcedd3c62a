"""One exception type per kind of user mistake; each message says what to do."""


class JaxserveError(Exception):
    """Base class of every error jaxserve raises on purpose."""


class InvalidConfigError(JaxserveError, ValueError):
    """An engine or model configuration value is out of range."""


class UnknownModelError(JaxserveError, ValueError):
    """The model name is neither a preset, a known embedded model, nor an existing path."""


class CheckpointError(JaxserveError, OSError):
    """A weight file is missing, truncated or corrupt. The message names the file."""


class InvalidSamplingParamsError(JaxserveError, ValueError):
    """A sampling parameter is out of range (temperature < 0, top_p outside (0, 1], ...)."""


class InvalidPromptError(JaxserveError, ValueError):
    """The prompt is empty, has out-of-vocabulary ids, or is longer than the context."""


class RequestTooLargeError(JaxserveError, ValueError):
    """The request can never fit in the KV cache (prompt + max_tokens exceed the page budget)."""


class CompileWhileServingError(JaxserveError, RuntimeError):
    """Something compiled after warm-up: a shape escaped the bucket ladder."""
