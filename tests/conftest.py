import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import data
    return data.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import engine
    model, tokenizer = engine.load_model(tiny_dir, "cpu")
    return model.eval(), tokenizer
