"""Shared fixtures: a tiny random Llama + byte-level BPE tokenizer, built once per session."""

import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and helpers/CI share 2 cores.
torch.set_num_threads(int(os.environ.get("INSTRUCTRL_TEST_THREADS", "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from instructrl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from instructrl.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def hh_file() -> Path:
    if not HH_FILE.exists():
        pytest.skip(f"real data not present: {HH_FILE} (see ../shared/data/README.md)")
    return HH_FILE
