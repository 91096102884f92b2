"""Shared test ground. Tests run offline on CPU against real components."""

import os

# No model hub is reachable: fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir():
    """The packaged SmolLM2-135M-Instruct as a plain model folder (materialised once)."""
    from pipeline.teacher import teacher_path

    return teacher_path()
