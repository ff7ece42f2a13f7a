"""Shared test helpers: offline mode, reference fixtures, tiny locally built models."""

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

# Tests never reach the Hub: everything they load is built and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
REPA_REFERENCE = FIXTURES / "repa_reference"
SIT_TINY = REPA_REFERENCE / "sit_tiny"


def load_reference(name: str) -> dict[str, torch.Tensor]:
    """Tensors of one reference file, e.g. ``load_reference("forward")`` for ``sit_tiny/forward.safetensors``."""
    return load_file(str(SIT_TINY / f"{name}.safetensors"))


def load_script(relative_path: str) -> ModuleType:
    """An entry-point script (e.g. ``"pipelines/evaluate.py"``) as a module, without putting its folder on sys.path,
    where ``pipelines/evaluate.py`` would shadow the ``evaluate`` package."""
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def sit_tiny_meta() -> dict:
    return json.loads((SIT_TINY / "meta.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield
