"""Test-wide settings: never touch a hub, keep embedded artefacts in a per-session cache."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("L3M_CACHE", str(Path(os.environ.get("PYTEST_L3M_CACHE", "/tmp")) / f"l3m-test-cache-{os.getpid()}"))

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # the tests' shared helpers (toy_problem, _tiny_models) import by name
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from l3m_lightning.policy import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture()
def single_thread():
    """Tiny tensors: one thread is faster and far less sensitive to other load on the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
