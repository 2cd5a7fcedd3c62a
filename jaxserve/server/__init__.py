"""OpenAI-compatible HTTP serving: `jaxserve serve` (FastAPI + uvicorn over one engine thread).

`protocol` (request parsing, response shaping) has no web dependencies and is shared with the offline batch
job (`jaxserve.batch`); `app` needs the `server` extra (`pip install "jaxserve[server]"`).
"""


def __getattr__(name):  # lazy: the batch job imports `protocol` without FastAPI installed
    if name in ("build_app", "run_server"):
        from jaxserve.server import app

        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["build_app", "run_server"]
