#!/usr/bin/env python
"""Offline batch generation over an OpenAI batch-format JSONL file: the same code as `jaxserve batch`.

    python scripts/batch_generate.py --input requests.jsonl --output results.jsonl [--model gemma3-270m]

Each input line: {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
The output is appended to and resumable: kill the job (even with SIGKILL) and run the same command again;
lines already answered are skipped and every custom_id ends up answered exactly once. See jaxserve/batch.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
