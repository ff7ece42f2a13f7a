"""Run by tests/test_fsdp2.py under `torchrun --nproc_per_node 2` (gloo, CPU): the trainer's TrainingStep and EMA on a
SiT sharded with FSDP2 (`fully_shard`), and the EMA's checkpoint round trip on shards.

accelerate only enables FSDP on accelerators, so the sharding is applied here directly; everything the trainer runs
per step (objective, accelerator backward / clipping / reductions, AdamW, diffusers' EMAModel) is the real code.
Writes `<out>/rank<r>.json` with what the test checks.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from diffusers_repa.models.transformer_sit import SiTTransformer2DModel
from diffusers_repa.training.ema import create_ema, ema_state_dict, load_ema_state_dict
from diffusers_repa.training.objectives import REPAFlowObjective
from diffusers_repa.training.step import TrainingStep

DECAY = 0.5


def full_weights(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [param.full_tensor().detach().clone() for param in params]


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_attention_heads=2, num_classes=4,
        encoder_depth=1, projection_dims=(),
    )  # fmt: skip
    for block in model.transformer_blocks:
        fully_shard(block)
    fully_shard(model)
    params = [param for param in model.parameters() if param.requires_grad]
    ema = create_ema(params, decay=DECAY)
    step = TrainingStep(
        accelerator,
        model,
        REPAFlowObjective(proj_coeff=0.0),
        torch.optim.AdamW(params, lr=1e-2),
        ema,
        torch.Generator().manual_seed(accelerator.process_index),
    )
    generator = torch.Generator().manual_seed(10 + accelerator.process_index)  # each process its own data
    expected = full_weights(params)  # the EMA starts as a copy of the weights
    losses = []
    for index in range(3):
        batch = {
            "image": torch.randint(0, 256, (4, 3, 8, 8), generator=generator, dtype=torch.uint8),
            "label": torch.randint(0, 4, (4,), generator=generator),
        }
        output = step(iter([batch]), index)
        losses.append(output.losses[0].item())
        expected = [DECAY * e + (1 - DECAY) * w for e, w in zip(expected, full_weights(params))]

    names = [f"p{i}" for i in range(len(params))]
    saved = ema_state_dict(ema, names)
    ema_error = max((saved[name] - value).abs().max().item() for name, value in zip(names, expected))
    restored = create_ema(params, decay=DECAY)  # starts from the current weights, then loads the saved averages
    load_ema_state_dict(restored, names, saved, step=ema.optimization_step)
    round_trip_error = max(
        (a.full_tensor() - b.full_tensor()).abs().max().item()
        for a, b in zip(ema.shadow_params, restored.shadow_params)
    )
    result = {
        "sharded": all(isinstance(param, DTensor) for param in params),
        "ema_sharded": all(isinstance(average, DTensor) for average in ema.shadow_params),
        "updates": ema.optimization_step,
        "restored_updates": restored.optimization_step,
        "losses": losses,
        "ema_error": ema_error,
        "round_trip_error": round_trip_error,
        "weights_checksum": sum(weight.double().sum().item() for weight in full_weights(params)),
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    # Both processes done before the group goes: a group left open (or closed under a peer) aborts at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
