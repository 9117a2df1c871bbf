"""Test-wide settings: never touch a hub, keep embedded artefacts in a per-session cache."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("L3M_CACHE", str(Path(os.environ.get("PYTEST_L3M_CACHE", "/tmp")) / f"l3m-test-cache-{os.getpid()}"))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from l3m_lightning.policy import load_tokenizer

    return load_tokenizer("embedded")
