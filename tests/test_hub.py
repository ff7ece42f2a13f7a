"""Publishing an export: the model card and the saved configs never carry a local path of the training machine."""

import json
from pathlib import Path

import pytest
import yaml
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard

import diffusers_repa.training.hub as hub_module
from diffusers_repa.pipelines import SiTPipeline
from diffusers_repa.training import REPATrainingArguments, render_model_card
from diffusers_repa.training.hub import find_local_paths, is_local_path, push_export_to_hub, remove_local_paths

from .conftest import tiny_sit_pipeline


@pytest.fixture
def saved_pipeline(tmp_path) -> Path:
    """A pipeline saved after loading its VAE from an absolute path, as the trainer's export does."""
    pipe = tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3)
    pipe.vae.save_pretrained(tmp_path / "assets" / "vae")
    pipe.vae = AutoencoderKL.from_pretrained(tmp_path / "assets" / "vae")
    pipe.save_pretrained(tmp_path / "export")
    return tmp_path / "export"


def test_is_local_path_tells_paths_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for value in ("/home/me/imgs", "~/imgs", "C:\\Users\\me\\imgs", "data/imgs"):
        assert is_local_path(value), value
    for value in ("stabilityai/sd-vae-ft-mse", "imagenet-1k", "dinov2-vit-b", ""):
        assert not is_local_path(value), value


def test_model_card_names_local_folders_by_name_and_keeps_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "flowers").mkdir(parents=True)
    args = REPATrainingArguments(
        dataset="data/flowers",
        vae=str(tmp_path / "assets" / "vae"),
        encoder=f"dinov2-vit-b,{tmp_path / 'assets' / 'encoder'}",
        pretrained_model="/home/me/runs/sit-base",
        lora_rank=4,
    )
    text = str(render_model_card(args, "me/sit-lora", num_steps=10))
    assert str(tmp_path) not in text and "/home/me" not in text
    assert "fine-tuned on `flowers (local folder)`" in text
    assert "| `vae` | `vae (local folder)` |" in text
    assert "| `encoder` | `dinov2-vit-b,encoder (local folder)` |" in text
    assert "| `pretrained_model` | `sit-base (local folder)` |" in text
    assert "base_model:" not in text and "datasets:" not in text  # no Hub metadata for local sources

    hub_card = str(render_model_card(REPATrainingArguments(dataset="user/flowers"), "me/sit", num_steps=10))
    assert "| `vae` | `stabilityai/sd-vae-ft-mse` |" in hub_card and "- user/flowers" in hub_card
    assert "local folder" not in hub_card


def test_model_card_lists_metrics_and_lora_base():
    args = REPATrainingArguments(pretrained_model="org/sit-xl-repa", lora_rank=16, dataset="user/flowers")
    card = render_model_card(args, "me/sit-lora", num_steps=500, metrics={"FID-50K": 3.2})
    text = str(card)
    assert "base_model: org/sit-xl-repa" in text and "- user/flowers" in text
    assert "| FID-50K | 3.2 |" in text and "A LoRA adapter (rank 16)" in text
    assert 'pipe.load_lora_weights("me/sit-lora")' in text and "Smoke test" not in text
    imagenet_card = str(render_model_card(REPATrainingArguments(encoder_depth=8), "me/sit-xl", num_steps=400000))
    assert "- ILSVRC/imagenet-1k" in imagenet_card and "trained from scratch on `imagenet-1k`" in imagenet_card
    assert "the output of block 8 is aligned" in imagenet_card
    full_fine_tune = REPATrainingArguments(pretrained_model="org/sit-xl-repa", dataset="user/flowers")
    text = str(render_model_card(full_fine_tune, "me/sit-flowers", num_steps=500))
    assert "fine-tuned from `org/sit-xl-repa` on `user/flowers`" in text and "from scratch" not in text
    assert "text_encoder" not in text  # a class-conditional model has none


def test_remove_local_paths_cleans_a_saved_pipeline_that_still_loads(saved_pipeline, tmp_path):
    vae_config = saved_pipeline / "vae" / "config.json"
    assert json.loads(vae_config.read_text())["_name_or_path"] == str(tmp_path / "assets" / "vae")
    assert find_local_paths(saved_pipeline) == [f"vae/config.json: {tmp_path / 'assets' / 'vae'}"]

    assert remove_local_paths(saved_pipeline) == ["vae/config.json"]
    assert json.loads(vae_config.read_text())["_name_or_path"] == "vae"
    assert find_local_paths(saved_pipeline) == []
    assert remove_local_paths(saved_pipeline) == []  # nothing left to change
    pipe = SiTPipeline.from_pretrained(saved_pipeline)
    assert pipe.vae.config.latent_channels == 4 and pipe.transformer.config.depth == 1


def test_find_local_paths_scans_text_files_only_and_ignores_urls(tmp_path):
    (tmp_path / "README.md").write_text(
        "Trained on /home/me/imgs. See https://huggingface.co/org/sit and SiT-XL/2 at 1/2 speed.\n"
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "run.yaml").write_text("cache_dir: ~/latents\nvae: stabilityai/sd-vae-ft-mse\n")
    (tmp_path / "weights.bin").write_bytes(b"/home/me/secret/path")
    assert find_local_paths(tmp_path) == ["README.md: /home/me/imgs.", "notes/run.yaml: ~/latents"]


def mock_hub(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(
        hub_module, "create_repo", lambda repo_id, **kwargs: calls.append(("create", repo_id)) or "url"
    )
    monkeypatch.setattr(hub_module, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    return calls


def test_push_cleans_configs_and_refuses_a_path_it_cannot_remove(saved_pipeline, tmp_path, monkeypatch):
    calls = mock_hub(monkeypatch)
    (saved_pipeline / "README.md").write_text(f"Samples in {tmp_path / 'samples'}\n")
    with pytest.raises(ValueError, match=rf"Not uploading .*README\.md: {tmp_path / 'samples'}"):
        push_export_to_hub(saved_pipeline, "me/sit")
    assert calls == []  # refused before anything was created on the Hub

    (saved_pipeline / "README.md").write_text("Samples in `samples/`\n")
    assert push_export_to_hub(saved_pipeline, "me/sit") == "url"
    assert calls[0] == ("create", "me/sit") and Path(calls[1][1]["folder_path"]) == saved_pipeline
    assert json.loads((saved_pipeline / "vae" / "config.json").read_text())["_name_or_path"] == "vae"


def front_matter(card) -> dict:
    """The card's YAML metadata, parsed the way the Hub reads it."""
    text = str(card)
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata_has_license_task_and_evaluation_results():
    args = REPATrainingArguments(dataset="digits", output_dir="runs/sit-repa-quickstart", vae="none")
    metrics = {"fd_digits": 5.0812, "class_accuracy": 0.98}
    card = render_model_card(args, "sit-repa-quickstart/pipeline", num_steps=2000, metrics=metrics)
    metadata = front_matter(card)
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "sit", "repa", "class-conditional", "image-generation"} <= set(metadata["tags"])
    [entry] = metadata["model-index"]
    assert entry["name"] == "sit-repa-quickstart"  # the run's name, not the export folder's
    [result] = entry["results"]
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"] == {"name": "digits", "type": "digits", "split": "train"}
    assert {metric["type"]: metric["value"] for metric in result["metrics"]} == metrics
    assert [(r.metric_type, r.metric_value) for r in ModelCard(str(card)).data.eval_results] == list(metrics.items())
    assert "UCI Optical Recognition of Handwritten Digits data set (CC BY 4.0)" in str(card)

    imagenet = render_model_card(
        REPATrainingArguments(hub_model_id="me/sit-xl"), "me/sit-xl", 400000, metrics={"FID": 1.8}
    )
    metadata = front_matter(imagenet)
    assert metadata["datasets"] == ["ILSVRC/imagenet-1k"] and metadata["model-index"][0]["name"] == "sit-xl"
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "ILSVRC/imagenet-1k"
    assert metadata["model-index"][0]["results"][0]["metrics"] == [{"type": "fid", "value": 1.8, "name": "FID"}]
    assert "non-commercial research and educational use only" in str(imagenet)
    assert "model-index" not in front_matter(render_model_card(args, "me/sit", num_steps=10))  # no metrics, no index


def test_model_card_snippets_load_the_export_folder_with_this_package_or_plain_diffusers():
    args = REPATrainingArguments(dataset="digits", output_dir="sit-repa-quickstart")
    text = str(render_model_card(args, "sit-repa-quickstart/pipeline", num_steps=2000))
    assert "# sit-repa-quickstart\n" in text and "pip install diffusers-repa" in text
    assert 'SiTPipeline.from_pretrained("sit-repa-quickstart/pipeline")' in text
    assert 'DiffusionPipeline.from_pretrained("sit-repa-quickstart/pipeline", trust_remote_code=True)' in text

    lora = str(render_model_card(REPATrainingArguments(pretrained_model="org/sit-xl", lora_rank=4), "me/lora", 10))
    assert 'DiffusionPipeline.from_pretrained("org/sit-xl", trust_remote_code=True)' in lora
    assert lora.count('pipe.load_lora_weights("me/lora")') == 2
