"""Shared test helpers: offline mode, reference fixtures, tiny locally built models."""

import importlib.util
import json
import os
import shutil
import tempfile
from hashlib import sha1
from pathlib import Path
from types import ModuleType

# Tests never reach the Hub: everything they load is built and saved locally. Caches that runs create under HF_HOME
# (latent caches, the digits encoder and classifier) go to a fresh folder, so a test sees what a fresh clone sees.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="diffusers-repa-tests-hf-home-")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
REPA_REFERENCE = FIXTURES / "repa_reference"
SIT_TINY = REPA_REFERENCE / "sit_tiny"


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so that the next Accelerator may use other settings (mixed
    precision, accumulation steps)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def tiny_sit_pipeline(latent_size: int, depth: int, num_classes: int):
    """A randomly initialised (seed 0) SiTPipeline that runs in milliseconds: a two-level VAE (images are twice the
    latent side), a width-32 SiT with one 8-d projector after block 1, and the SDE scheduler."""
    from diffusers import AutoencoderKL

    from diffusers_repa.models import SiTTransformer2DModel
    from diffusers_repa.pipelines import SiTPipeline
    from diffusers_repa.schedulers import SiTSDEScheduler

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=2 * latent_size,
        )
        transformer = SiTTransformer2DModel(
            sample_size=latent_size,
            patch_size=2,
            hidden_size=32,
            depth=depth,
            num_attention_heads=2,
            num_classes=num_classes,
            encoder_depth=1,
            projector_dim=16,
            projection_dims=(8,),
        )
    return SiTPipeline(transformer=transformer, vae=vae, scheduler=SiTSDEScheduler())


@pytest.fixture(scope="session")
def sit_tiny_meta() -> dict:
    return json.loads((SIT_TINY / "meta.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def write_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out as the cached snapshot of a Hub model repo, as an online download leaves it: files under
    snapshots/<commit>/, refs/main, and the repo's file listing in trees/<commit>.json.

    With the listing cached, diffusers' stock `download` inspects model_index.json the way it does online and
    rejects components from this package, which `SiTPipeline.download` must get past.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    files = {
        path.relative_to(snapshot).as_posix(): {
            "size": path.stat().st_size,
            "blob_id": sha1(path.read_bytes()).hexdigest(),
        }
        for path in snapshot.rglob("*")
        if path.is_file()
    }
    (repo / "trees").mkdir()
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
