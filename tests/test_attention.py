"""SiT attention through diffusers' attention machinery: backends, processors, fused projections, LoRA target names,
checkpoints and adapters of the former layout, xFormers and attention slicing."""

import importlib.util

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from diffusers_repa.conversion import convert_repa_checkpoint
from diffusers_repa.models import SiTAttnProcessor, SiTTransformer2DModel
from diffusers_repa.pipelines import SiTPipeline
from diffusers_repa.schedulers import SiTODEScheduler

from .conftest import SIT_TINY, load_reference

# The backends of diffusers 0.42 that run on a CPU; the others need CUDA, a missing package or other hardware.
CPU_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]
# Checked on a CUDA machine only (PyTorch's own kernels, then those of optional packages: skipped when absent).
GPU_BACKENDS = ["_native_cudnn", "_native_efficient", "_native_flash", "flash", "_flash_3", "sage", "xformers"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def tiny_sit() -> SiTTransformer2DModel:
    return convert_repa_checkpoint(SIT_TINY / "official_state_dict.safetensors", num_heads=4, encoder_depth=2).eval()


def velocity(model: SiTTransformer2DModel) -> torch.Tensor:
    reference = load_reference("forward")
    with torch.no_grad():
        return model(reference["x"], reference["t"], reference["y"], return_projections=False).sample


@pytest.fixture(autouse=True)
def restore_active_backend():
    # `set_attention_backend` also changes diffusers' process-wide default backend: give it back to other tests.
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(scope="module")
def default_velocity() -> torch.Tensor:
    return velocity(tiny_sit())


def legacy_state_dict(model: SiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """The model's weights as the former SiT attention saved them: fused `to_qkv` (rows [q; k; v]), `to_out`."""
    state = {}
    for key, tensor in model.state_dict().items():
        if ".attn.to_q." in key:
            parts = [model.state_dict()[key.replace(".to_q.", f".to_{name}.")] for name in "qkv"]
            state[key.replace(".to_q.", ".to_qkv.")] = torch.cat(parts).clone()
        elif ".attn.to_k." not in key and ".attn.to_v." not in key:
            state[key.replace(".attn.to_out.0.", ".attn.to_out.")] = tensor.clone()
    return state


def test_attention_uses_diffusers_projection_names():
    model = tiny_sit()
    names = {name.split("attn.", 1)[1] for name, _ in model.named_parameters() if ".attn." in name}
    assert names == {f"to_{p}.{kind}" for p in ("q", "k", "v", "out.0") for kind in ("weight", "bias")}
    assert set(model.attn_processors) == {f"transformer_blocks.{i}.attn.processor" for i in range(4)}
    assert all(isinstance(p, SiTAttnProcessor) for p in model.attn_processors.values())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_give_the_default_output(backend, default_velocity):
    model = tiny_sit()
    model.set_attention_backend(backend)
    assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName(backend)}
    output = velocity(model)
    assert relative_error(output, default_velocity) <= 1e-5
    assert relative_error(output, load_reference("forward")["velocity"]) <= 1e-5
    model.reset_attention_backend()
    assert {p._attention_backend for p in model.attn_processors.values()} == {None}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_float32_attention(backend):
    # SiT-XL's head size (72 = 1152 / 16), bfloat16 as in sampling; non-zero adaLN and output layers.
    torch.manual_seed(0)
    model = SiTTransformer2DModel(
        sample_size=16, hidden_size=1152, depth=2, num_attention_heads=16, encoder_depth=1, projection_dims=()
    )
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model = model.cuda().eval()
    x, t, y = torch.randn(4, 4, 16, 16, device="cuda"), torch.rand(4, device="cuda"), torch.arange(4, device="cuda")
    with torch.no_grad():
        expected = model(x, t, y).sample
        model.to(torch.bfloat16)
        try:
            model.set_attention_backend(backend)
        except RuntimeError as error:  # the backend's package is not installed
            pytest.skip(str(error))
        actual = model(x.bfloat16(), t, y).sample
    assert relative_error(actual, expected) <= 3e-2


def test_unknown_and_unavailable_backends_are_clear_errors():
    model = tiny_sit()
    with pytest.raises(ValueError, match="must be one of the following"):
        model.set_attention_backend("fastest")
    with pytest.raises(RuntimeError, match="torch_npu"):  # a backend whose package is missing
        model.set_attention_backend("_native_npu")


def test_attention_processors_round_trip(default_velocity):
    model = tiny_sit()
    calls = []

    class CountingProcessor(SiTAttnProcessor):
        def __call__(self, attn, hidden_states):
            calls.append(attn)
            return super().__call__(attn, hidden_states)

    original = model.attn_processors
    replacement = {name: CountingProcessor() for name in original}
    model.set_attn_processor(dict(replacement))
    assert model.attn_processors == replacement
    assert relative_error(velocity(model), default_velocity) == 0
    assert calls == [block.attn for block in model.transformer_blocks]

    model.set_attn_processor(dict(original))  # diffusers empties the dict it is given
    assert model.attn_processors == original
    shared = SiTAttnProcessor()
    model.set_attn_processor(shared)  # one processor for every layer
    assert set(map(id, model.attn_processors.values())) == {id(shared)}
    with pytest.raises(ValueError, match="does not match the number of attention layers"):
        model.set_attn_processor({"transformer_blocks.0.attn.processor": shared})


def test_fused_qkv_projections_give_the_same_output(default_velocity):
    model = tiny_sit()
    model.fuse_qkv_projections()
    for block in model.transformer_blocks:
        attn = block.attn
        assert attn.fused_projections
        expected = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        torch.testing.assert_close(attn.to_qkv.weight, expected, rtol=0, atol=0)
    assert relative_error(velocity(model), default_velocity) <= 1e-6
    model.unfuse_qkv_projections()
    assert not any(hasattr(block.attn, "to_qkv") for block in model.transformer_blocks)
    torch.testing.assert_close(velocity(model), default_velocity, rtol=0, atol=0)


def test_lora_with_diffusers_target_names_trains():
    model = tiny_sit()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapted == {
        f"transformer_blocks.{i}.attn.{p}" for i in range(4) for p in ("to_q", "to_k", "to_v", "to_out.0")
    }
    base = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(
        "lora_" in name for name, p in model.named_parameters() if p.requires_grad
    )  # add_adapter freezes the base weights
    before = velocity(model)

    reference = load_reference("forward")
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        output = model(reference["x"], reference["t"], reference["y"], return_projections=False).sample
        loss = output.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert relative_error(velocity(model), before) > 1e-3
    for name, p in model.named_parameters():
        if name in base:
            torch.testing.assert_close(p, base[name], rtol=0, atol=0)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_folder_saved_with_the_former_attention_names_loads(tmp_path, default_velocity, low_cpu_mem_usage):
    model = tiny_sit()
    legacy = legacy_state_dict(model)
    assert "transformer_blocks.0.attn.to_qkv.weight" in legacy and "transformer_blocks.0.attn.to_out.bias" in legacy
    model.save_config(tmp_path)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))

    loaded = SiTTransformer2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(velocity(loaded), default_velocity, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # the split projections share no storage


def test_state_dict_with_the_former_attention_names_loads(default_velocity):
    model = tiny_sit()
    fresh = SiTTransformer2DModel.from_config(model.config).eval()
    fresh.load_state_dict(legacy_state_dict(model), strict=True)
    torch.testing.assert_close(velocity(fresh), default_velocity, rtol=0, atol=0)


def test_lora_adapter_of_the_former_layout_loads_exactly(tmp_path):
    torch.manual_seed(0)
    base = tiny_sit()
    rank, alpha, dim = 2, 4, base.config.hidden_size
    adapter, merged = {}, tiny_sit()
    for i, block in enumerate(merged.transformer_blocks):
        prefix = f"transformer_blocks.{i}.attn"
        qkv_a, qkv_b = torch.randn(rank, dim) * 0.1, torch.randn(3 * dim, rank) * 0.1
        out_a, out_b = torch.randn(rank, dim) * 0.1, torch.randn(dim, rank) * 0.1
        adapter |= {
            f"{prefix}.to_qkv.lora_A.weight": qkv_a,
            f"{prefix}.to_qkv.lora_B.weight": qkv_b,
            f"{prefix}.to_out.lora_A.weight": out_a,
            f"{prefix}.to_out.lora_B.weight": out_b,
        }
        with torch.no_grad():  # what the adapter adds: (alpha / rank) · B·A on each (former) layer
            deltas = ((alpha / rank) * qkv_b @ qkv_a).chunk(3)
            for layer, delta in zip((block.attn.to_q, block.attn.to_k, block.attn.to_v), deltas):
                layer.weight += delta
            block.attn.to_out[0].weight += (alpha / rank) * out_b @ out_a
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["attn.to_qkv", "attn.to_out"])
    SiTPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=adapter, transformer_lora_adapter_metadata=config.to_dict()
    )

    pipe = SiTPipeline(base, None, SiTODEScheduler())
    pipe.load_lora_weights(tmp_path)
    assert pipe.transformer.peft_config["default_0"].target_modules == {
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
    }
    assert pipe.transformer.peft_config["default_0"].lora_alpha == alpha
    assert relative_error(velocity(pipe.transformer), velocity(merged)) <= 1e-5


def test_peft_state_dict_uses_the_new_names():
    model = tiny_sit()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    keys = get_peft_model_state_dict(model)
    assert "transformer_blocks.0.attn.to_out.0.lora_B.weight" in keys
    assert not any("to_qkv" in key for key in keys)


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None, reason="xFormers can run here"
)
def test_xformers_without_xformers_or_cuda_is_a_clear_error():
    model = tiny_sit()
    # diffusers' behaviour: ModuleNotFoundError without the package, ValueError without CUDA.
    with pytest.raises((ModuleNotFoundError, ValueError), match="xformers"):
        model.enable_xformers_memory_efficient_attention()
    assert {p._attention_backend for p in model.attn_processors.values()} == {None}


def test_disabling_xformers_returns_to_the_default_backend():
    model = tiny_sit()
    for processor in model.attn_processors.values():  # as enable_xformers_memory_efficient_attention leaves them
        processor._attention_backend = AttentionBackendName.XFORMERS
    model.disable_xformers_memory_efficient_attention()
    assert {p._attention_backend for p in model.attn_processors.values()} == {None}


def test_attention_slicing_is_refused_clearly(default_velocity):
    model = tiny_sit()
    with pytest.raises(NotImplementedError, match="set_attention_backend"):
        model.set_attention_slice(2)
    pipe = SiTPipeline(model, None, SiTODEScheduler())
    with pytest.raises(NotImplementedError, match="no sliced attention"):
        pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()  # nothing to undo
    torch.testing.assert_close(velocity(model), default_velocity, rtol=0, atol=0)
