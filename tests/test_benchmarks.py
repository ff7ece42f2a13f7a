"""The benchmark scripts run end to end on a tiny model and report sane numbers; the FLOP model is exact.

No timing is asserted: only that every measured number is positive and finite, the fields are there, and the
counted quantities (FLOPs, model evaluations under guidance intervals) are right.
"""

import json
import math

import pytest
import torch
from benchmarks import sampling_throughput, train_throughput
from benchmarks.common import peak_tflops
from diffusers import AutoencoderKL
from huggingface_hub import try_to_load_from_cache
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_repa.encoders import load_encoder, save_tiny_random_encoder
from diffusers_repa.models.tiny_vae import save_tiny_random_vae
from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.pipelines.pipeline_sit import SiTPipeline
from diffusers_repa.schedulers import SiTSDEScheduler
from diffusers_repa.training.objectives import REPAFlowObjective
from diffusers_repa.training.step import TrainingStep

TINY_SIT = ["--preset", "SiT-S/2", "--depth", "2", "--hidden_size", "64", "--num_attention_heads", "2"]
CPU_RUN = ["--device", "cpu", "--num_threads", "1", "--resolution", "64", "--batch_size", "2"]


@pytest.fixture(scope="module")
def tiny_encoder_path(tmp_path_factory):
    return save_tiny_random_encoder("dinov2", tmp_path_factory.mktemp("encoder") / "dinov2")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _assert_positive_finite(record, keys):
    for key in keys:
        assert isinstance(record[key], (int, float)) and math.isfinite(record[key]) and record[key] > 0, key


def _counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("with_projections", [True, False])
def test_sit_flops_match_torch_flop_counter(with_projections):
    # The math SDPA kernel is made of bmm's that FlopCounterMode counts; the fused CPU kernel is not counted.
    model = SiTTransformer2DModel.from_preset(
        "SiT-S/2",
        depth=2,
        hidden_size=64,
        num_attention_heads=2,
        encoder_depth=1,
        sample_size=8,
        projection_dims=(48,),
    )
    inputs = (torch.randn(1, 4, 8, 8), torch.rand(1), torch.zeros(1, dtype=torch.long))
    counted = _counted_flops(lambda: model(*inputs, return_projections=with_projections))
    assert train_throughput.sit_forward_flops(model.config, with_projections) == counted


def test_sit_xl_flops_are_the_known_size():
    # DiT reports 118.6 GFLOPs for XL/2 counting a multiply-add as one; we count it as two (plus the projector).
    with torch.device("meta"):  # the config is all that is needed; no 675M weights to initialise
        config = SiTTransformer2DModel.from_preset("SiT-XL/2").config
    assert train_throughput.sit_forward_flops(config, with_projections=False) / 2e9 == pytest.approx(118.6, rel=0.01)


def test_encoder_flops_match_torch_flop_counter(tiny_encoder_path):
    encoder = load_encoder(tiny_encoder_path, resolution=64)
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    assert train_throughput.encoder_forward_flops(encoder) == _counted_flops(lambda: encoder(images))


def test_peak_table_by_device_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, precision, expected in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.4),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cuda, precision)[0] == expected
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a flag object that monkeypatch cannot restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert peak_tflops(cuda, "fp32") == (494.7, "H100 dense tf32")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert peak_tflops(cuda, "fp32") == (66.9, "H100 dense fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert peak_tflops(cuda, "bf16")[0] is None
    assert peak_tflops(torch.device("cpu"), "bf16")[0] is None


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: an fp16 accelerator, as the trainer's (scaler on CUDA)
def test_train_throughput_main(tiny_encoder_path, tmp_path, precision):
    argv = TINY_SIT + CPU_RUN + ["--encoder_depth", "1", "--encoder", str(tiny_encoder_path), "--precision", precision]
    argv += ["--fused_adamw", "--warmup", "1", "--iterations", "1", "--repeats", "2", "--output", str(tmp_path)]
    result = train_throughput.main(argv)

    assert json.loads((tmp_path / "train_throughput.json").read_text()) == result
    assert (tmp_path / "train_throughput.md").read_text().startswith("| device | model | batch |")
    _assert_positive_finite(
        result, ["step_time_s", "images_per_s", "peak_memory_gib", "achieved_tflops", "train_gflops_per_image"]
    )
    assert len(result["step_time_s_all"]) == 2
    assert result["images_per_s"] == pytest.approx(2 / result["step_time_s"])
    assert result["fused_adamw"] and result["precision"] == precision and result["mfu"] is None  # no CPU peak table
    assert result["model"] == "SiT-S/2 (depth=2, hidden_size=64, num_attention_heads=2, encoder_depth=1)"
    # 3 × SiT forward + one encoder forward.
    assert result["train_gflops_per_image"] > 3 * result["sit_forward_gflops_per_image"]


def test_the_benchmark_times_the_trainers_own_step(tiny_encoder_path, monkeypatch):
    # By construction: the benchmark's step is diffusers_repa.training.TrainingStep with the trainer's objective.
    calls = []
    original = TrainingStep.__call__
    monkeypatch.setattr(TrainingStep, "__call__", lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    encoder = load_encoder(tiny_encoder_path, 32)
    bench = train_throughput.TrainingStepBenchmark.with_random_inputs(
        "SiT-S/2",
        2,
        32,
        torch.device("cpu"),
        encoder,
        {"depth": 2, "hidden_size": 64, "num_attention_heads": 2, "encoder_depth": 1},
    )
    before = [param.detach().clone() for param in bench.params]
    bench.step_function(train_throughput.StepOptions(precision="fp32"))()
    (step,) = calls
    assert isinstance(step.objective, REPAFlowObjective) and step.ema is bench.ema
    assert step.ema.optimization_step == 1 and not all(map(torch.equal, before, bench.params))


def test_train_throughput_compiled_as_the_trainer(tiny_encoder_path):
    # The GPU headline's path: `--compile` compiles the blocks and the encoder, as the trainer's `--compile` does.
    argv = TINY_SIT + CPU_RUN + ["--encoder_depth", "1", "--encoder", str(tiny_encoder_path), "--compile"]
    result = train_throughput.main(argv + ["--warmup", "1", "--iterations", "1", "--repeats", "1"])
    assert result["compile"] and result["compile_encoder"]
    _assert_positive_finite(result, ["step_time_s", "images_per_s", "first_step_s"])


def test_train_throughput_ablation(tiny_encoder_path):
    argv = TINY_SIT + CPU_RUN + ["--encoder_depth", "1", "--encoder", str(tiny_encoder_path), "--ablate"]
    result = train_throughput.main(argv + ["--warmup", "0", "--iterations", "1", "--repeats", "1"])

    measured = [r for r in result["ablation"] if not r.get("skipped")]
    assert [r["step"] for r in measured] == [
        "baseline",
        "bf16",
        "sdpa_flash",
        "fused_adamw",
        "foreach_ema",
        "encoder_bf16",
    ]
    assert [r["step"] for r in result["ablation"] if r.get("skipped")] == ["compile", "encoder_compile"]  # opt-in
    assert measured[0]["speedup_vs_baseline"] == 1.0
    assert (measured[0]["precision"], measured[0]["sdpa"], measured[0]["foreach_ema"]) == ("fp32", "math", False)
    cumulative = {
        "precision": "bf16",
        "sdpa": "flash",
        "fused_adamw": True,
        "foreach_ema": True,
        "encoder_precision": "bf16",
    }
    assert {key: measured[-1][key] for key in cumulative} == cumulative
    for record in measured:
        _assert_positive_finite(record, ["step_time_s", "images_per_s", "speedup_vs_baseline", "speedup_vs_previous"])


def test_ablation_rejects_unknown_step():
    with pytest.raises(ValueError, match="Unknown ablation step"):
        train_throughput.ablation_steps(("bf16", "warp_drive"))


def test_sampling_throughput_counts_guided_evaluations(tmp_path):
    # Compiled: the images are counted on the eager model first, so the count must still be right.
    argv = TINY_SIT + CPU_RUN + ["--vae", "none", "--sampler", "sde", "--steps", "2", "--repeats", "1"]
    result = sampling_throughput.main(argv + ["--precision", "fp32", "--compile", "blocks", "--output", str(tmp_path)])

    assert json.loads((tmp_path / "sampling_throughput.json").read_text()) == result
    _assert_positive_finite(
        result,
        [
            "seconds_per_call",
            "images_per_s",
            "images_per_s_cfg_everywhere",
            "interval_speedup",
            "eager_seconds_per_call",
            "compile_speedup",
            "first_compiled_calls_s",
        ],
    )
    assert result["compile"] == "blocks"
    assert result["compile_speedup"] == pytest.approx(result["eager_seconds_per_call"] / result["seconds_per_call"])
    # SDE times [1, 0.04]: with the interval (0, 0.7) only the second step is guided (1 + 2 images), else 2 + 2.
    assert result["model_evaluations_per_image"] == 3
    assert result["model_evaluations_per_image_cfg_everywhere"] == 4
    assert result["expected_interval_speedup"] == pytest.approx(4 / 3)
    assert result["decode"] is False and result["guidance_interval"] == [0.0, 0.7]


def test_sampling_throughput_with_vae_decode(tmp_path):
    vae = save_tiny_random_vae(tmp_path / "vae")
    argv = TINY_SIT + CPU_RUN + ["--vae", str(vae), "--sampler", "ode-heun", "--steps", "2", "--repeats", "1"]
    result = sampling_throughput.main(argv + ["--guidance_interval", "0", "1"])

    assert result["decode"] is True and result["compile"] == "none" and result["compile_speedup"] is None
    # Heun, 2 steps: predictor + corrector on the first step, Euler on the last; all guided (interval = everything).
    assert result["model_evaluations_per_image"] == result["model_evaluations_per_image_cfg_everywhere"] == 6
    _assert_positive_finite(result, ["images_per_s", "peak_memory_gib"])


def test_sampling_throughput_of_a_saved_pipeline(tmp_path):
    transformer = SiTTransformer2DModel.from_preset(
        "SiT-S/2", depth=1, hidden_size=32, num_attention_heads=2, sample_size=8, projection_dims=()
    )
    vae = AutoencoderKL.from_pretrained(save_tiny_random_vae(tmp_path / "vae"))
    SiTPipeline(transformer, vae, SiTSDEScheduler()).save_pretrained(tmp_path / "pipeline")
    argv = ["--pipeline", str(tmp_path / "pipeline"), "--vae", "none", "--sampler", "ode-euler", "--steps", "2"]
    result = sampling_throughput.main(argv + CPU_RUN + ["--repeats", "1"])

    assert result["model"] == f"{tmp_path / 'pipeline'}, no VAE decode" and result["decode"] is False
    assert result["sampler"] == "ode-euler" and result["model_evaluations_per_image_cfg_everywhere"] == 4


def test_sampling_needs_guidance():
    with pytest.raises(ValueError, match="guidance_scale must be > 1"):
        sampling_throughput.main(TINY_SIT + CPU_RUN + ["--vae", "none", "--guidance_scale", "1"])


def test_missing_dinov2_falls_back_to_random_encoder_of_same_shape():
    if try_to_load_from_cache("facebook/dinov2-small", "config.json"):
        pytest.skip("the real facebook/dinov2-small is cached here")
    encoder, label = train_throughput.load_benchmark_encoder("dinov2-vit-s", 64, torch.device("cpu"))
    assert label.startswith("random dinov2-vit-s")
    config = encoder.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (
        384,
        12,
        6,
        14,
    )
    assert encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 16, 384)
