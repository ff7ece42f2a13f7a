"""A saved pipeline carries its own code: plain diffusers loads it with ``trust_remote_code=True`` in a Python where
this package cannot be imported and draws the same images; this package loads it as its own classes."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers.utils.hub_utils as hub_utils
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from peft import LoraConfig

from diffusers_repa.models import SiTTransformer2DModel
from diffusers_repa.pipelines import SiTPipeline
from diffusers_repa.pipelines.hub_code import flat_module_source
from diffusers_repa.schedulers import SiTODEScheduler
from diffusers_repa.training.export import write_export

from .conftest import tiny_sit_pipeline

# Run in a fresh interpreter: hides this package (the editable install's finder included) before anything imports it,
# then loads every folder given with plain diffusers and saves its images.
REMOTE_SCRIPT = """
import importlib.abc, json, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "diffusers_repa":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HidePackage())
try:
    import diffusers_repa
except ModuleNotFoundError:
    pass
else:
    sys.exit("diffusers_repa is importable")

import numpy as np, torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
for folder, lora, output, labels in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(labels, num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="np").images
    np.save(output, images)
    print(folder, type(pipe).__module__, type(pipe.transformer).__module__, type(pipe.scheduler).__module__)
print("loaded:", sorted(name for name in sys.modules if name.startswith("diffusers_repa")))
"""
# Name → (saved pipeline, LoRA adapter on it or None, class labels: names from id2label too).
CASES = {
    "latent": ("latent", None, [0, 1, 2]),
    "pixel": ("pixel", None, ["digit 1", 7]),
    "export": ("export", None, [2, 0]),
    "lora": ("latent", "lora", [0, 1, 2]),
}


def with_random_zero_weights(pipe: SiTPipeline) -> SiTPipeline:
    """`pipe` with the weights that adaLN-Zero starts at zero drawn at random (seed 0), so that every block, the final
    layer and a LoRA adapter on the attention change the images."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return pipe


def pixel_pipeline() -> SiTPipeline:
    """A pixel-space pipeline (no VAE) with the Heun ODE scheduler and class names."""
    torch.manual_seed(0)
    transformer = SiTTransformer2DModel(
        sample_size=8,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_attention_heads=2,
        num_classes=10,
        projection_dims=(),
    )
    pipe = SiTPipeline(
        transformer=transformer,
        vae=None,
        scheduler=SiTODEScheduler(solver="heun"),
        id2label={str(i): f"digit {i}" for i in range(10)},
    )
    return with_random_zero_weights(pipe)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, single_thread) -> dict[str, Path]:
    """Folders written by `save_pretrained` (a latent and a pixel-space pipeline) and by the trainer's export."""
    root = tmp_path_factory.mktemp("remote_code")
    latent = with_random_zero_weights(tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3))
    latent.save_pretrained(root / "latent")
    torch.manual_seed(0)
    latent.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    latent.transformer.save_lora_adapter(root / "lora")  # what the trainer's LoRA export writes
    pixel_pipeline().save_pretrained(root / "pixel")
    write_export(
        root / "export",
        with_random_zero_weights(tiny_sit_pipeline(latent_size=4, depth=2, num_classes=3)),
        lora=False,
        grid=PIL.Image.new("RGB", (8, 8)),
        card=ModelCard("---\nlibrary_name: diffusers\n---\n# tiny\n"),
        global_step=1,
    )
    return {name: root / name for name in ("latent", "pixel", "export", "lora")}


@pytest.fixture(scope="module")
def remote_images(saved, tmp_path_factory) -> dict[str, np.ndarray]:
    """Images that plain diffusers draws from each saved folder, in a Python without this package."""
    work = tmp_path_factory.mktemp("remote_run")
    jobs = [
        (str(saved[folder]), lora and str(saved[lora]), str(work / f"{name}.npy"), labels)
        for name, (folder, lora, labels) in CASES.items()
    ]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(work / "modules")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, json.dumps(jobs)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout
    for folder in ("latent", "pixel", "export"):  # the classes came from the saved files
        assert f"{saved[folder]} diffusers_modules.local.pipeline_sit diffusers_modules.local.transformer_sit" in (
            result.stdout
        )
    return {name: np.load(work / f"{name}.npy") for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_plain_diffusers_without_this_package_draws_the_same_images(saved, remote_images, name):
    folder, lora, labels = CASES[name]
    pipe = SiTPipeline.from_pretrained(saved[folder])
    if lora is not None:
        pipe.load_lora_weights(saved[lora])
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(labels, num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="np")
    assert images.images.shape == remote_images[name].shape
    np.testing.assert_array_equal(images.images, remote_images[name])


def test_the_lora_adapter_changes_the_remote_images(remote_images):
    """The same draws with the adapter loaded: the model's (randomised) attention shapes the images."""
    assert np.abs(remote_images["lora"] - remote_images["latent"]).max() > 1e-3


def imported_packages(source: str) -> set[str]:
    """Top-level packages a module imports anywhere in its code, ``"."`` for relative imports."""
    packages = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            packages |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            packages.add("." if node.level else node.module.partition(".")[0])
    return packages


def test_saved_folder_names_its_code_files(saved):
    index = json.loads((saved["latent"] / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sit", "SiTPipeline"]
    assert index["transformer"] == ["transformer_sit", "SiTTransformer2DModel"]
    assert index["scheduler"] == ["scheduling_sit_sde", "SiTSDEScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    for relative in ("pipeline_sit.py", "transformer/transformer_sit.py", "scheduler/scheduling_sit_sde.py"):
        imported = imported_packages((saved["latent"] / relative).read_text())
        assert {"torch", "diffusers"} <= imported and not imported & {"diffusers_repa", "."}, relative
    pixel_index = json.loads((saved["pixel"] / "model_index.json").read_text())
    assert pixel_index["scheduler"] == ["scheduling_sit_ode", "SiTODEScheduler"] and pixel_index["vae"] == [None, None]
    assert (saved["pixel"] / "scheduler" / "scheduling_sit_ode.py").is_file()
    assert (saved["export"] / "transformer" / "transformer_sit.py").is_file()


def test_this_package_loads_its_own_classes_and_never_runs_the_saved_code(saved, tmp_path):
    folder = Path(shutil.copytree(saved["latent"], tmp_path / "pipeline"))
    for code in folder.rglob("*.py"):
        code.write_text("raise RuntimeError('the saved code ran')\n")
    pipe = SiTPipeline.from_pretrained(folder)
    assert type(pipe) is SiTPipeline and type(pipe.transformer) is SiTTransformer2DModel
    assert type(pipe.scheduler).__module__ == "diffusers_repa.schedulers.scheduling_sit_sde"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)  # plain diffusers runs it only when asked to


def test_folders_saved_before_the_code_files_still_load(saved, tmp_path):
    """model_index.json of earlier versions names this package's modules and has no code files."""
    pipe = SiTPipeline.from_pretrained(saved["latent"])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index |= {
        "_class_name": "SiTPipeline",
        "transformer": ["diffusers_repa.models.transformer_sit", "SiTTransformer2DModel"],
        "scheduler": ["diffusers_repa.schedulers.scheduling_sit_sde", "SiTSDEScheduler"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for code in tmp_path.rglob("*.py"):
        code.unlink()
    loaded = SiTPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is SiTTransformer2DModel and loaded.transformer.config.depth == 1


def load_generated(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_generated_transformer_is_the_library_one(tmp_path, single_thread):
    """The saved transformer file is made from the live module: same parameters, same outputs."""
    path = tmp_path / "transformer_sit.py"
    path.write_text(flat_module_source(SiTTransformer2DModel.__module__))
    generated = load_generated(path, "generated_transformer_sit").SiTTransformer2DModel
    model = with_random_zero_weights(tiny_sit_pipeline(latent_size=4, depth=2, num_classes=3)).transformer.eval()
    copy = generated.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())  # strict: the same parameter and buffer names
    assert [name for name, _ in copy.named_parameters()] == [name for name, _ in model.named_parameters()]
    inputs = {"timestep": torch.tensor([0.3, 0.9]), "class_labels": torch.tensor([0, 3])}
    x = torch.randn(2, 4, 4, 4)
    expected, actual = model(x, **inputs), copy(x, **inputs)
    assert expected.sample.abs().min() > 0
    torch.testing.assert_close(actual.sample, expected.sample, rtol=0, atol=0)
    for got, want in zip(actual.projections, expected.projections, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_push_to_hub_uploads_the_code(tmp_path, monkeypatch):
    """`save_pretrained(push_to_hub=True)` and `push_to_hub` save through the override, so the upload has the code."""
    uploads = []

    def upload(self, folder, repo_id, **kwargs):
        uploads.append((repo_id, sorted(path.relative_to(folder).as_posix() for path in Path(folder).rglob("*.py"))))

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kwargs: type("Url", (), {"repo_id": repo_id}))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *args, **kwargs: ModelCard("# card"))
    monkeypatch.setattr(SiTPipeline, "_upload_folder", upload)
    pipe = tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3)
    pipe.save_pretrained(tmp_path / "sit-local", push_to_hub=True, repo_id="me/sit", commit_message="weights")
    code = ["pipeline_sit.py", "scheduler/scheduling_sit_sde.py", "transformer/transformer_sit.py"]
    assert sorted(p.relative_to(tmp_path / "sit-local").as_posix() for p in tmp_path.rglob("*.py")) == code
    pipe.push_to_hub("me/sit-2")
    assert uploads == [("me/sit", code), ("me/sit-2", code)]


def test_a_compiled_transformer_is_saved_with_its_own_code(tmp_path):
    pipe = tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3)
    pipe.transformer = torch.compile(pipe.transformer)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["transformer"] == [
        "transformer_sit",
        "SiTTransformer2DModel",
    ]
    assert "class SiTTransformer2DModel(" in (tmp_path / "transformer" / "transformer_sit.py").read_text()


MMDIT_REMOTE_SCRIPT = (
    REMOTE_SCRIPT.split("import numpy as np, torch")[0]
    + """
import numpy as np, torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
folder, embeds, output = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
context = torch.from_numpy(np.load(embeds))
images = pipe(prompt_embeds=context[:2], negative_prompt_embeds=context[2:], num_inference_steps=3, guidance_scale=2.0,
              generator=torch.Generator().manual_seed(0), output_type="np").images
np.save(output, images)
print(type(pipe).__module__, type(pipe.transformer).__module__)
"""
)


def test_the_text_to_image_pipeline_also_loads_in_plain_diffusers(tmp_path, single_thread):
    from diffusers_repa import MMDiTPipeline, MMDiTTransformer2DModel
    from diffusers_repa.models.tiny_vae import tiny_random_vae

    torch.manual_seed(0)
    transformer = MMDiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, depth=2, num_attention_heads=2, attention_head_dim=8,
        joint_attention_dim=16, encoder_depth=1, projector_dim=16, projection_dims=(8,),
    )  # fmt: skip
    pipe = MMDiTPipeline(transformer, tiny_random_vae(), SiTODEScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "mmdit")
    context = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "context.npy", context.numpy())
    kwargs = {"num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np"}
    expected = pipe(
        prompt_embeds=context[:2],
        negative_prompt_embeds=context[2:],
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    command = [sys.executable, "-c", MMDIT_REMOTE_SCRIPT, str(tmp_path / "mmdit"), str(tmp_path / "context.npy")]
    completed = subprocess.run([*command, str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "diffusers_repa" not in completed.stdout  # the classes came from the saved files
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
