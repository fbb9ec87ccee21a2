"""Running the installed ``lora-merge`` against the local Hub server of ``fake_hub``.

The suite runs offline (conftest.py); a command started with :func:`push_env` may reach
the local server only, with the xet protocol switched off (fake_hub speaks LFS).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fake_hub import FakeHub
from merge_process import LORA_MERGE

# The repos a fake Hub serves in the --low-disk and --part tests, and the repo they push to.
BASE_REPO, ADAPTER_REPO, TARGET = "org/base-model", "org/adapter", "me/merged"
SHARD_SIZE = "20KB"  # the handmade base's 57.7 kB of tensors in 4 output shards

# What would point huggingface_hub somewhere other than the environment push_env builds.
HF_VARIABLES = (
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
)


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``lora-merge ARGS`` as a user runs it, output captured, at most two minutes."""
    return subprocess.run(
        [LORA_MERGE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def push_env(hub: FakeHub, home: Path, token: str | None = None) -> dict[str, str]:
    """A user's environment whose Hub is the fake one (and whose token is ``token``).

    The suite runs offline (conftest.py); this one process may reach the local server only.
    """
    env = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=token or hub.token,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env
