"""Text-to-image evaluation (the original's COCO protocol) offline: the CLIP score against a hand computation with
a tiny random CLIPModel, generation by prompts with a tiny MMDiTPipeline (prompts file or captions dataset; each
sample's prompt written next to it; resumable), FID against U-ViT-style statistics (mu, sigma only), and the clear
errors of the scripts."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

import diffusers_repa.evaluation.evaluator as evaluator
from diffusers_repa.cli import run_cli
from diffusers_repa.evaluation import (
    CLIPScorer,
    clip_pair_scores,
    clip_score_of,
    compute_clip_score,
    compute_statistics,
    evaluate_samples,
    frechet_distance,
    generate_samples,
    load_dataset_captions,
    read_sample_prompts,
)
from diffusers_repa.evaluation.generate import sample_seed
from diffusers_repa.models.tiny_text_encoder import save_letter_tokenizer, tiny_clip_text_encoder
from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel
from diffusers_repa.pipelines import MMDiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler

from .conftest import load_script, tiny_sit_pipeline
from .test_evaluation import TinyInception, random_images

TEXT_DIM = 16
CLIP_SIDE = 32
PROMPTS = ["a red bus", "a cat on a mat", "two dogs"]
SETTINGS = {"sampler": "ode", "num_inference_steps": 2, "guidance_scale": 2.0, "show_progress": False}

generate_script = load_script("pipelines/generate.py")
evaluate_script = load_script("pipelines/evaluate.py")
sample_script = load_script("pipelines/sample.py")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel (both towers, 16-d joint space) with a letter tokenizer and a 32-px image processor,
    saved as `CLIPScorer.from_pretrained` reads openai/clip-vit-large-patch14."""
    folder = tmp_path_factory.mktemp("tiny-clip-model")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CLIP_SIDE,
        patch_size=8,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=tiny_clip_text_encoder(32).config.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIDE}, crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=save_letter_tokenizer(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_folder) -> CLIPScorer:
    return CLIPScorer.from_pretrained(clip_folder, device="cpu")


def tiny_mmdit_pipeline(tokenizer_folder) -> MMDiTPipeline:
    """Pixel space (8×8 RGB), a 2-block MMDiT reading the 16-d features of a tiny CLIP text encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = MMDiTTransformer2DModel.from_depth(
            depth=2, sample_size=8, in_channels=3, joint_attention_dim=TEXT_DIM, projection_dims=()
        ).eval()
    tokenizer = save_letter_tokenizer(tokenizer_folder)
    pipe = MMDiTPipeline(transformer, None, SiTODEScheduler(), tokenizer, tiny_clip_text_encoder(TEXT_DIM))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mmdit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmdit")
    tiny_mmdit_pipeline(folder / "letters").save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def error_line(script, argv: list[str], capsys) -> str:
    """The last stderr line of a run that must fail with a user error (exit status 2)."""
    assert run_cli(script.main, argv, prog="script.py") == 2
    return capsys.readouterr().err.splitlines()[-1]


# --- CLIP score ---------------------------------------------------------------------------------------------------


def test_clip_score_equals_a_hand_computation(clip_folder, scorer):
    images = random_images(0, 5, size=CLIP_SIDE)
    texts = ["a cat", "a red bus on a street", "dog", "tree", "a bowl of fruit"]
    # By hand: CLIP's normalisation of the 32-px images (no resize needed), then CLIPModel's own forward, whose
    # logits_per_image are exp(logit_scale) · cos(image_i, text_j).
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    mean, std = np.array(processor.image_processor.image_mean), np.array(processor.image_processor.image_std)
    pixels = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        cosines = logits.logits_per_image.diagonal().double() / model.logit_scale.exp().double()
    expected = 100.0 * cosines.numpy()

    scores = clip_pair_scores(images, texts, scorer, batch_size=2, show_progress=False)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
    # A set's score is the mean of its pairs' (one pair here scores below 0 and still counts), clipped at 0.
    pair = [0, 2]
    assert expected[pair].mean() > 0 > expected[pair].min()
    score = compute_clip_score(images[pair], [texts[i] for i in pair], scorer, batch_size=1, show_progress=False)
    assert score == pytest.approx(expected[pair].mean(), abs=1e-4)
    assert expected.mean() < 0
    assert compute_clip_score(images, texts, scorer, batch_size=3, show_progress=False) == 0.0


def test_the_set_score_clips_the_mean_not_each_pair():
    # torchmetrics' CLIPScore: max(mean(100·cos), 0); clipping each pair first would give (0 + 9) / 2.
    assert clip_score_of(np.array([-5.0, 9.0])) == pytest.approx(2.0)
    assert clip_score_of(np.array([-5.0, 1.0])) == 0.0


def test_matching_pairs_score_differently_from_shuffled_ones(scorer):
    images = random_images(1, 6, size=48)  # resized and cropped by the processor
    texts = ["a cat", "a red bus", "dog", "tree", "a bowl of fruit", "two birds"]
    matched = clip_pair_scores(images, texts, scorer, batch_size=4, show_progress=False)
    permutation = np.array([3, 0, 5, 1, 2, 4])
    # The score belongs to the pair: permuting images and texts together permutes the scores...
    permuted = clip_pair_scores(images[permutation], [texts[i] for i in permutation], scorer, show_progress=False)
    np.testing.assert_allclose(permuted, matched[permutation], atol=1e-4)
    # ...while pairing the images with shuffled texts changes every score and the set's score.
    shuffled = clip_pair_scores(images, [texts[i] for i in permutation], scorer, show_progress=False)
    assert np.abs(shuffled - matched).min() > 1e-3
    assert abs(shuffled.mean() - matched.mean()) > 1e-3
    with pytest.raises(ValueError, match="5 images but 6 prompts"):
        clip_pair_scores(images[:5], texts, scorer, show_progress=False)


# --- generation by prompts ----------------------------------------------------------------------------------------


def test_generate_by_prompts_pairs_every_sample_with_its_prompt_and_resumes(tmp_path, mmdit_folder, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is no prompt
    output = tmp_path / "samples"
    argv = ["--pipeline", str(mmdit_folder), "--output_dir", str(output), "--prompts_file", str(prompts_file),
            "--num_samples", "5", "--batch_size", "2", "--sampler", "ode", "--steps", "2", "--guidance_scale", "2"]  # fmt: skip
    generate_script.main(argv)
    assert "Wrote 5 samples" in capsys.readouterr().out
    expected_prompts = [PROMPTS[i % 3] for i in range(5)]  # more samples than prompts: they cycle
    assert json.loads((output / "prompts.json").read_text()) == expected_prompts
    assert read_sample_prompts(output) == expected_prompts
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as packed:
        assert packed["arr_0"].shape == (5, 8, 8, 3) and "arr_1" not in packed.files
        assert packed["prompts"].tolist() == expected_prompts
    assert read_sample_prompts(tmp_path / "samples.npz") == expected_prompts

    # Sample i is the pipeline's image for its own prompt from its own seeded noise.
    pipe = MMDiTPipeline.from_pretrained(mmdit_folder)
    pipe.set_progress_bar_config(disable=True)
    for index in (0, 4):
        noise = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(sample_seed(0, index, 1)))
        image = pipe(expected_prompts[index], latents=noise[None], num_inference_steps=2, guidance_scale=2.0,
                     output_type="pt").images  # fmt: skip
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(output / f"{index:06d}.png")), image)

    # An interrupted run resumes: a missing sample is drawn again, identical; the others are kept.
    first = (output / "000003.png").read_bytes()
    (output / "000003.png").unlink()
    kept = (output / "000001.png").stat().st_mtime_ns
    generate_script.main(argv)
    assert (output / "000003.png").read_bytes() == first
    assert (output / "000001.png").stat().st_mtime_ns == kept

    # Other prompts are other settings: refused, nothing overwritten.
    prompts_file.write_text("a green tree\n")
    line = error_line(generate_script, argv, capsys)
    assert "other settings (prompts_sha256 differ)" in line
    assert json.loads((output / "prompts.json").read_text()) == expected_prompts


def test_captions_dataset_gives_one_caption_per_row(tmp_path):
    folder = tmp_path / "coco_val"
    folder.mkdir()
    rows = [{"caption": [" A bus on a street.\n", "A red bus."]}, {"caption": ["Two dogs."]}, {"caption": ["A cat."]}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_dataset_captions(folder) == ["A bus on a street.", "Two dogs.", "A cat."]
    assert load_dataset_captions(folder, max_rows=2) == ["A bus on a street.", "Two dogs."]
    with pytest.raises(ValueError, match="no column 'text'.*--caption_column"):
        load_dataset_captions(folder, caption_column="text")

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": ["x"]}),
            "validation": datasets.Dataset.from_dict({"sentence": ["a cat", "a dog"]}),
        }
    ).save_to_disk(saved)
    assert load_dataset_captions(saved, "sentence") == ["a cat", "a dog"]  # "validation" of several splits
    assert load_dataset_captions(saved, "sentence", split="train") == ["x"]


def test_generate_from_a_captions_dataset(tmp_path, mmdit_folder):
    folder = tmp_path / "captions"
    folder.mkdir()
    (folder / "val.jsonl").write_text("\n".join(json.dumps({"text": text}) for text in PROMPTS))
    output = tmp_path / "samples"
    generate_script.main(
        ["--pipeline", str(mmdit_folder), "--output_dir", str(output), "--captions_dataset", str(folder),
         "--caption_column", "text", "--num_samples", "2", "--sampler", "ode", "--steps", "1"]
    )  # fmt: skip
    assert json.loads((output / "prompts.json").read_text()) == PROMPTS[:2]
    assert sorted(path.name for path in output.glob("*.png")) == ["000000.png", "000001.png"]


def test_prompts_and_pipelines_must_match(tmp_path, mmdit_folder, capsys):
    sit_folder = tmp_path / "sit"
    tiny_sit_pipeline(latent_size=4, depth=1, num_classes=3).save_pretrained(sit_folder)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n")
    common = ["--num_samples", "1", "--steps", "1", "--sampler", "ode"]
    line = error_line(
        generate_script,
        ["--pipeline", str(sit_folder), "--output_dir", str(tmp_path / "a"), "--prompts_file", str(prompts_file),
         *common],
        capsys,
    )  # fmt: skip
    assert line.startswith("script.py: error: Prompts were given, but the SiTPipeline is class-conditional")
    line = error_line(
        generate_script, ["--pipeline", str(mmdit_folder), "--output_dir", str(tmp_path / "b"), *common], capsys
    )
    assert line.startswith("script.py: error: The MMDiTPipeline is text-to-image: give the prompts")
    line = error_line(
        generate_script,
        ["--pipeline", str(mmdit_folder), "--output_dir", str(tmp_path / "b"), "--prompts_file", str(prompts_file),
         "--label_sampling", "equal", *common],
        capsys,
    )  # fmt: skip
    assert line.startswith("script.py: error: --label_sampling chooses class labels; text-to-image samples follow")
    assert not list(tmp_path.glob("[ab]/*.png"))

    # Without a text encoder an MMDiTPipeline cannot encode prompts: refused before any sample.
    pipe = tiny_mmdit_pipeline(tmp_path / "letters")
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="no tokenizer and text_encoder"):
        generate_samples(pipe, tmp_path / "c", prompts=["a cat"], **SETTINGS)


def test_sample_script_draws_a_grid_of_prompts(tmp_path, mmdit_folder, capsys):
    sample_script.main(
        ["--model", str(mmdit_folder), "--prompt", "a cat", "a red bus", "--sampler", "ode", "--steps", "2",
         "--guidance_scale", "1.5", "--output", str(tmp_path / "grid.png"), "--save_individual", str(tmp_path / "each")]
    )  # fmt: skip
    assert "Wrote a 1x2 grid of 2 images" in capsys.readouterr().out
    assert [Image.open(path).size for path in sorted((tmp_path / "each").iterdir())] == [(8, 8), (8, 8)]
    line = error_line(sample_script, ["--model", str(mmdit_folder), "--class_labels", "1", "--steps", "1"], capsys)
    assert (
        line
        == f"script.py: error: {mmdit_folder} is a text-to-image MMDiTPipeline: give --prompt instead of --class_labels."
    )


# --- FID against U-ViT-style statistics and the evaluate script -----------------------------------------------


def test_fid_against_mu_sigma_statistics_only(tmp_path):
    samples, real = random_images(2, 24), random_images(3, 30, offset=30)
    with torch.no_grad():
        real_pool = TinyInception()(torch.from_numpy(real).permute(0, 3, 1, 2)).pool.double().numpy()
        sample_pool = TinyInception()(torch.from_numpy(samples).permute(0, 3, 1, 2)).pool.double().numpy()
    mu, sigma = compute_statistics(real_pool)
    np.savez(tmp_path / "fid_stats_mscoco256_val.npz", mu=mu, sigma=sigma)  # U-ViT's layout: nothing else
    metrics = evaluate_samples(
        samples, tmp_path / "fid_stats_mscoco256_val.npz", inception=TinyInception(), device="cpu",
        inception_score_splits=2, show_progress=False,
    )  # fmt: skip
    assert metrics["fid"] == pytest.approx(frechet_distance(*compute_statistics(sample_pool), mu, sigma), rel=1e-6)
    assert not {"sfid", "precision", "recall"} & set(metrics) and metrics["num_reference_images"] == 0
    np.savez(tmp_path / "mu_only.npz", mu=mu)
    with pytest.raises(ValueError, match="neither images"):
        evaluate_samples(samples, tmp_path / "mu_only.npz", inception=TinyInception(), show_progress=False)


def test_evaluate_script_fid_and_clip_score(tmp_path, clip_folder, scorer, monkeypatch, capsys):
    loaded = []

    def fake_loader(weights_path, device):
        loaded.append(TinyInception())
        return loaded[-1]

    monkeypatch.setattr(evaluator, "load_fid_inception", fake_loader)
    samples, real = random_images(4, 12), random_images(5, 20)
    prompts = [f"caption {'abcdefghijkl'[i]}" for i in range(12)]
    np.savez(tmp_path / "samples.npz", arr_0=samples, prompts=np.array(prompts))
    with torch.no_grad():
        mu, sigma = compute_statistics(TinyInception()(torch.from_numpy(real).permute(0, 3, 1, 2)).pool.double())
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    weights = tmp_path / "w.pth"
    weights.touch()
    output = tmp_path / "metrics.json"
    evaluate_script.main(
        ["--samples", str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "stats.npz"),
         "--inception_weights", str(weights), "--inception_resize", "pytorch_fid", "--clip_score",
         "--clip_model", str(clip_folder), "--batch_size", "5", "--device", "cpu", "--output", str(output)]
    )  # fmt: skip
    assert loaded[0].resize_convention == "pytorch_fid"
    printed = capsys.readouterr().out
    assert "CLIP score" in printed and "sFID" not in printed
    written = json.loads(output.read_text())
    assert written["clip_score"] == pytest.approx(compute_clip_score(samples, prompts, scorer, show_progress=False))
    expected_fid = evaluate_samples(
        samples, tmp_path / "stats.npz", inception=TinyInception(), inception_score_splits=10, show_progress=False
    )["fid"]
    assert written["fid"] == pytest.approx(expected_fid, rel=1e-6)

    # The CLIP score alone needs no reference; the prompts may come from a file.
    np.savez(tmp_path / "bare.npz", arr_0=samples)
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    evaluate_script.main(
        ["--samples", str(tmp_path / "bare.npz"), "--clip_score", "--clip_model", str(clip_folder),
         "--prompts", str(tmp_path / "p.json"), "--device", "cpu", "--output", str(output)]
    )  # fmt: skip
    assert json.loads(output.read_text())["clip_score"] == pytest.approx(written["clip_score"])
    assert json.loads(output.read_text())["reference"] is None

    line = error_line(
        evaluate_script, ["--samples", str(tmp_path / "bare.npz"), "--clip_score", "--clip_model", str(clip_folder)],
        capsys,
    )  # fmt: skip
    assert "No prompts for" in line and "--prompts" in line
    (tmp_path / "p.json").write_text(json.dumps(prompts[:5]))
    line = error_line(
        evaluate_script,
        ["--samples", str(tmp_path / "bare.npz"), "--clip_score", "--clip_model", str(clip_folder), "--prompts",
         str(tmp_path / "p.json")],
        capsys,
    )  # fmt: skip
    assert "12 samples but 5 prompts" in line
