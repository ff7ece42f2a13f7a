"""Run by tests/test_fsdp2.py under `torchrun --nproc_per_node 2` (gloo, CPU): the trainer's TrainingStep and EMA on a
SiT sharded with FSDP2 (`fully_shard`), the EMA's checkpoint round trip on shards, and a resume that continues exactly.

accelerate only enables FSDP on accelerators, so the sharding is applied here directly; everything the trainer runs
per step (objective, accelerator backward / clipping / reductions, AdamW, diffusers' EMAModel) is the real code.

Three runs in each process:
  uninterrupted: 6 steps from the start.
  saved: the same first 3 steps (checking the EMA against the gathered weights and its round trip), then a checkpoint
    written as the trainer writes one: `save_checkpoint` (atomic folder, accelerate's `save_state` for the RNG
    states) whose extra files are model and AdamW state through accelerate's own FSDP2 functions (`save_fsdp_model`
    / `save_fsdp_optimizer`: torch.distributed.checkpoint on the sharded state dicts — what `save_state` calls when
    its FSDP2 plugin is on, which it cannot be on CPU), the EMA through `ema_state_dict`, the noise generator and the
    step.
  resumed: a fresh sharded model, optimizer and EMA built from other seeds, loaded from that checkpoint the way the
    trainer's `_restore` does, then steps 4–6.
Writes `<out>/rank<r>.json` with what the test checks.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    FullyShardedDataParallelPlugin,
    load_fsdp_model,
    load_fsdp_optimizer,
    save_fsdp_model,
    save_fsdp_optimizer,
)
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.training.checkpointing import TRAINER_STATE_NAME, load_safetensors, save_checkpoint
from diffusers_repa.training.ema import create_ema, ema_state_dict, load_ema_state_dict
from diffusers_repa.training.objectives import REPAFlowObjective
from diffusers_repa.training.step import TrainingStep

DECAY = 0.5
STEPS = 6
SAVED_AT = 3
EMA_NAME = "ema.safetensors"


@dataclass
class Run:
    model: SiTTransformer2DModel
    params: list[torch.nn.Parameter]
    names: list[str]
    optimizer: torch.optim.AdamW
    ema: EMAModel
    step: TrainingStep
    losses: list[float]


def build(accelerator: Accelerator, seed: int) -> Run:
    """A sharded SiT (initialised from `seed`), its AdamW, EMA and training step (noise generator from `seed` too)."""
    torch.manual_seed(seed)
    model = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_attention_heads=2, num_classes=4,
        encoder_depth=1, projection_dims=(),
    )  # fmt: skip
    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)
    names_and_params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    params = [param for _, param in names_and_params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ema = create_ema(params, decay=DECAY)
    generator = torch.Generator().manual_seed(100 * seed + accelerator.process_index)
    step = TrainingStep(accelerator, model, REPAFlowObjective(proj_coeff=0.0), optimizer, ema, generator)
    return Run(model, params, [name for name, _ in names_and_params], optimizer, ema, step, [])


def batch(rank: int, index: int) -> dict[str, torch.Tensor]:
    """Micro-batch `index` of process `rank`: each process its own data, the same in every run (the data position a
    resume continues from)."""
    generator = torch.Generator().manual_seed(1000 * rank + index)
    return {
        "image": torch.randint(0, 256, (4, 3, 8, 8), generator=generator, dtype=torch.uint8),
        "label": torch.randint(0, 4, (4,), generator=generator),
    }


def train(run: Run, accelerator: Accelerator, steps: range, on_step=None) -> None:
    for index in steps:
        output = run.step(iter([batch(accelerator.process_index, index)]), index)
        run.losses.append(output.losses[0].item())
        if on_step is not None:
            on_step(run)


def full_weights(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [param.full_tensor().detach().clone() for param in params]


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |a − b| over this process's shards (0.0 only where every element is bit-equal, NaN included)."""
    assert len(a) == len(b)
    worst = 0.0
    for x, y in zip(a, b):
        x, y = local(x).detach(), local(y).detach()
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf")
        if not torch.equal(x, y):
            worst = max(worst, (x.double() - y.double()).abs().max().item(), 1e-300)
    return worst


def optimizer_tensors(run: Run) -> list[torch.Tensor]:
    """AdamW's state (step, exp_avg, exp_avg_sq) of every parameter, in parameter order."""
    tensors = []
    for param in run.params:
        state = run.optimizer.state[param]
        tensors += [state[key] for key in sorted(state)]
    return tensors


def save(run: Run, accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, output_dir: Path) -> Path:
    """The checkpoint at step SAVED_AT, written as the trainer writes one (see the module docstring)."""

    def write_extra(folder: Path) -> None:
        save_fsdp_model(plugin, accelerator, run.model, str(folder))  # DCP, sharded: pytorch_model_fsdp_0/
        save_fsdp_optimizer(plugin, accelerator, run.optimizer, run.model, str(folder))  # DCP: optimizer_0/
        ema_weights = ema_state_dict(run.ema, run.names)  # collective: every process gathers
        if accelerator.is_main_process:
            save_file(ema_weights, folder / EMA_NAME)
            state = {"global_step": SAVED_AT, "ema_updates": run.ema.optimization_step}
            (folder / TRAINER_STATE_NAME).write_text(json.dumps(state))
        random_state = {"generator": run.step.generator.get_state(), "torch_rng": torch.get_rng_state()}
        save_file(random_state, folder / f"generator_{accelerator.process_index}.safetensors")

    return save_checkpoint(accelerator, output_dir, SAVED_AT, write_extra)


def restore(run: Run, accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, folder: Path) -> int:
    """Load the checkpoint into a fresh run, in the trainer's order (`Trainer._restore`); returns the step."""
    random_state = load_safetensors(folder / f"generator_{accelerator.process_index}.safetensors")
    accelerator.load_state(str(folder))  # no prepared objects: the RNG states (random_states_<rank>.pkl)
    if not torch.equal(torch.get_rng_state(), random_state["torch_rng"]):
        raise ValueError("accelerate's load_state did not restore the global RNG")
    load_fsdp_model(plugin, accelerator, run.model, str(folder))
    load_fsdp_optimizer(plugin, accelerator, run.optimizer, run.model, str(folder))
    saved = json.loads((folder / TRAINER_STATE_NAME).read_text())
    load_ema_state_dict(run.ema, run.names, load_safetensors(folder / EMA_NAME), saved["ema_updates"])
    run.step.generator.set_state(random_state["generator"])
    return saved["global_step"]


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    # What accelerate's save_state / load_state use under FSDP2 (the default state dict type: sharded, via DCP).
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)

    uninterrupted = build(accelerator, seed=0)
    train(uninterrupted, accelerator, range(STEPS))
    uninterrupted_rng = torch.get_rng_state()  # label dropout draws from it

    saved = build(accelerator, seed=0)
    expected = full_weights(saved.params)  # the EMA starts as a copy of the weights

    def average(run: Run) -> None:  # what the EMA should hold: the average of the gathered weights, step by step
        expected[:] = [DECAY * e + (1 - DECAY) * w for e, w in zip(expected, full_weights(run.params))]

    train(saved, accelerator, range(SAVED_AT), on_step=average)
    averages = ema_state_dict(saved.ema, saved.names)
    ema_error = max((averages[name] - value).abs().max().item() for name, value in zip(saved.names, expected))
    restored_ema = create_ema(saved.params, decay=DECAY)  # starts from the current weights, then loads the averages
    load_ema_state_dict(restored_ema, saved.names, averages, step=saved.ema.optimization_step)
    round_trip_error = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item()
        for a, b in zip(saved.ema.shadow_params, restored_ema.shadow_params)
    )
    checkpoint = save(saved, accelerator, plugin, out / "checkpoints")
    saved_weights = [param.detach().clone() for param in saved.params]  # local shards at the checkpoint
    updates = saved.ema.optimization_step
    del saved

    resumed = build(accelerator, seed=1)  # other weights, noise and global RNG: the checkpoint must set them all
    fresh_differs = max_difference(resumed.params, saved_weights) > 0
    start = restore(resumed, accelerator, plugin, checkpoint)
    loaded_error = max_difference(resumed.params, saved_weights)
    train(resumed, accelerator, range(start, STEPS))

    result = {
        "sharded": all(isinstance(param, DTensor) for param in uninterrupted.params + resumed.params),
        "ema_sharded": all(isinstance(a, DTensor) for run in (uninterrupted, resumed) for a in run.ema.shadow_params),
        "updates": updates,
        "restored_updates": restored_ema.optimization_step,
        "losses": uninterrupted.losses[:SAVED_AT],
        "ema_error": ema_error,
        "round_trip_error": round_trip_error,
        "weights_checksum": sum(weight.double().sum().item() for weight in full_weights(uninterrupted.params)),
        # The resume.
        "checkpoint_files": sorted(path.name for path in checkpoint.iterdir()),
        "start": start,
        "fresh_differs": fresh_differs,
        "loaded_error": loaded_error,
        "uninterrupted_losses": uninterrupted.losses,
        "resumed_losses": resumed.losses,
        "weights_difference": max_difference(uninterrupted.params, resumed.params),
        "optimizer_difference": max_difference(optimizer_tensors(uninterrupted), optimizer_tensors(resumed)),
        "num_params": len(uninterrupted.params),
        "optimizer_state_sizes": [len(run.optimizer.state) for run in (uninterrupted, resumed)],
        "ema_difference": max_difference(uninterrupted.ema.shadow_params, resumed.ema.shadow_params),
        "ema_updates": [run.ema.optimization_step for run in (uninterrupted, resumed)],
        "generator_equal": torch.equal(uninterrupted.step.generator.get_state(), resumed.step.generator.get_state()),
        "rng_equal": torch.equal(uninterrupted_rng, torch.get_rng_state()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Both processes done before the group goes: a group left open (or closed under a peer) aborts at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
