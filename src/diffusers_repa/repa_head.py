"""REPA for any diffusers transformer: projector MLPs plus a forward hook that captures the image tokens of block k.

`SiTTransformer2DModel` has its projectors built in (``return_projections``). Other transformers (diffusers'
`DiTTransformer2DModel`, `PixArtTransformer2DModel`, `SanaTransformer2DModel`, `SD3Transformer2DModel`,
`FluxTransformer2DModel`, ...) are left untouched: a [`REPAHead`] holds the projectors and, while a forward pass of the
transformer runs inside ``head.capture(transformer)``, keeps the output of block ``encoder_depth`` (1-based) of the
transformer's block list:

```python
head = REPAHead.for_transformer(transformer, projection_dims=(768,), encoder_depth=8)
with head.capture(transformer) as captured:
    output = transformer(x_t, timestep=t, class_labels=y).sample
loss = denoising + proj_coeff * projection_loss(targets, head(captured.hidden_states))
```

For a training step that handles one model, [`TransformerWithREPAHead`] puts both in one module whose call returns
``(sample, projections)`` like `SiTTransformer2DModel(..., return_dict=False)`.

Captured tokens are (N, T, D): the image stream only (SD3's and Flux's blocks return ``(encoder_hidden_states,
hidden_states)``, `output_index` picks the image one), in the transformer's own token order, which for the patch
embeddings of DiT, PixArt, Sana and SD3 (and Flux's packed latents) is the row-major patch grid, as REPA's encoder
tokens are. The head is trained with the transformer (its parameters go to the optimizer) and saved on its own
(``save_pretrained`` / ``from_pretrained``: ``config.json`` + safetensors), beside the transformer and not in the
exported pipeline, which samples without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# Where the blocks of known diffusers transformers live and which element of a block's output is the image stream.
# SD3's JointTransformerBlock and Flux's double- and single-stream blocks return (encoder_hidden_states,
# hidden_states); for Flux, block_list="single_transformer_blocks" aligns after a single-stream block instead.
KNOWN_TRANSFORMERS: dict[str, tuple[str, int | None]] = {
    "SiTTransformer2DModel": ("transformer_blocks", None),
    "DiTTransformer2DModel": ("transformer_blocks", None),
    "PixArtTransformer2DModel": ("transformer_blocks", None),
    "SanaTransformer2DModel": ("transformer_blocks", None),
    "SD3Transformer2DModel": ("transformer_blocks", 1),
    "FluxTransformer2DModel": ("transformer_blocks", 1),
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = next(
            (
                getattr(model, name)
                for name in ("module", "_orig_mod")
                if isinstance(getattr(model, name, None), nn.Module)
            ),
            None,
        )
        if inner is None:
            return model
        model = inner


def _hidden_size(transformer: nn.Module) -> int:
    """Token width of a diffusers transformer: ``num_attention_heads · attention_head_dim``, or SiT's hidden_size."""
    config = transformer.config
    if "hidden_size" in config:
        return int(config["hidden_size"])
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


@dataclass
class CapturedTokens:
    """What one ``REPAHead.capture`` context saw: the image tokens (N, T, D) after block `encoder_depth`."""

    hidden_states: torch.Tensor | None = None


class REPAHead(ModelMixin, ConfigMixin):
    r"""REPA projectors for a transformer that has none, fed by a forward hook on one of its blocks.

    Args:
        hidden_size (`int`): width D of the captured tokens.
        projection_dims (`tuple[int]`): output width of each projector, one per alignment target (its feature width).
        encoder_depth (`int`): 1-based index of the block whose output is aligned (block ``encoder_depth − 1`` of the
            block list).
        projector_dim (`int`): width of the projector MLPs (REPA: 2048).
        block_list (`str`): attribute of the transformer holding its blocks (an `nn.ModuleList`).
        output_index (`int`, *optional*): when the blocks return a tuple, the index of the image stream in it; None
            for blocks returning the hidden states tensor.
    """

    @register_to_config
    def __init__(
        self,
        hidden_size: int,
        projection_dims: Sequence[int] = (768,),
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        block_list: str = "transformer_blocks",
        output_index: int | None = None,
    ):
        super().__init__()
        if not projection_dims:
            raise ValueError("REPAHead needs at least one projection dim (one per alignment target).")
        if encoder_depth < 1:
            raise ValueError(f"encoder_depth is 1-based and must be at least 1, got {encoder_depth}.")
        # JSON has no tuples: store a list so that a saved and reloaded config compares equal.
        self.register_to_config(projection_dims=list(projection_dims))
        # Same architecture and initialisation (xavier weights, zero biases) as SiT's and REPA's projectors.
        self.projectors = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, dim),
            )
            for dim in projection_dims
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def for_transformer(
        cls,
        transformer: nn.Module,
        projection_dims: Sequence[int] = (768,),
        encoder_depth: int = 8,
        projector_dim: int = 2048,
        **overrides,
    ) -> REPAHead:
        """A head sized for `transformer` (a class of `KNOWN_TRANSFORMERS`; others need `block_list`/`output_index`).

        The token width is read from the transformer's config; `overrides` replace `block_list`, `output_index`.
        """
        transformer = unwrap_model(transformer)
        name = type(transformer).__name__
        if name not in KNOWN_TRANSFORMERS and "block_list" not in overrides:
            raise ValueError(
                f"Unknown transformer class {name}: pass block_list= (and output_index= if its blocks return "
                f"tuples). Known: {', '.join(KNOWN_TRANSFORMERS)}."
            )
        block_list, output_index = KNOWN_TRANSFORMERS.get(name, ("transformer_blocks", None))
        config = {"block_list": block_list, "output_index": output_index, **overrides}
        head = cls(
            hidden_size=_hidden_size(transformer),
            projection_dims=projection_dims,
            encoder_depth=encoder_depth,
            projector_dim=projector_dim,
            **config,
        )
        head.hooked_block(transformer)  # fail now, not at the first step, when the depth exceeds the blocks
        return head

    def hooked_block(self, transformer: nn.Module) -> nn.Module:
        """The block of `transformer` whose output is captured: ``getattr(transformer, block_list)[encoder_depth − 1]``."""
        transformer = unwrap_model(transformer)
        blocks = getattr(transformer, self.config.block_list, None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(transformer).__name__} has no block list {self.config.block_list!r}.")
        if self.config.encoder_depth > len(blocks):
            raise ValueError(
                f"encoder_depth {self.config.encoder_depth} exceeds the {len(blocks)} blocks of "
                f"{type(transformer).__name__}.{self.config.block_list}."
            )
        return blocks[self.config.encoder_depth - 1]

    def _image_tokens(self, output: torch.Tensor | tuple) -> torch.Tensor:
        index = self.config.output_index
        if isinstance(output, tuple):
            if index is None:
                raise ValueError(
                    f"The hooked block returns a tuple of {len(output)}; set output_index to the image stream's index."
                )
            output = output[index]
        elif index is not None:
            raise ValueError(f"output_index={index} but the hooked block returns a single {type(output).__name__}.")
        if not isinstance(output, torch.Tensor) or output.ndim != 3 or output.shape[-1] != self.config.hidden_size:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"Expected image tokens (N, T, {self.config.hidden_size}) from the block, got {shape}.")
        return output

    @contextlib.contextmanager
    def capture(self, transformer: nn.Module) -> Iterator[CapturedTokens]:
        """Keep the image tokens after block `encoder_depth` of the forward passes of `transformer` in this context.

        The hook exists only inside the context, so that backward passes (and gradient checkpointing's recomputation
        after the context) never capture. Yields a [`CapturedTokens`] whose `hidden_states` (N, T, D) is the output
        of the last forward pass (None if none ran).
        """
        captured = CapturedTokens()

        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            captured.hidden_states = self._image_tokens(output)

        handle = self.hooked_block(transformer).register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projections of captured tokens (N, T, D): one (N, T, projection_dims[k]) tensor per target, in order."""
        if hidden_states is None:
            raise ValueError("No tokens were captured: run the transformer inside `head.capture(transformer)`.")
        return tuple(projector(hidden_states) for projector in self.projectors)


class TransformerWithREPAHead(nn.Module):
    """A transformer and its [`REPAHead`] as one module, with SiT's training interface.

    What a training step that handles one model prepares (DDP/FSDP), clips, checkpoints and hands to the optimizer:
    the head is used inside `forward`, so distributed wrappers reduce its gradients like the transformer's. Export
    the parts separately: ``transformer.save_pretrained(...)`` into the pipeline, ``head.save_pretrained(...)``
    beside it.

    Args:
        transformer: any transformer the head can hook (see [`REPAHead`]).
        head: its projectors.
    """

    def __init__(self, transformer: nn.Module, head: REPAHead):
        super().__init__()
        head.hooked_block(transformer)  # a depth beyond the block list fails here, not at the first step
        self.transformer = transformer
        self.head = head

    def forward(
        self, *args, return_projections: bool = True, **kwargs
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``transformer(*args, **kwargs)`` as the tuple ``(sample, projections)`` (SiT's ``return_dict=False``).

        `projections` holds one (N, T, projection_dims[k]) tensor per target, or is empty when
        ``return_projections=False`` (then no hook is registered). A `return_dict` argument is ignored.
        """
        kwargs["return_dict"] = False
        if not return_projections:
            return self.transformer(*args, **kwargs)[0], ()
        with self.head.capture(self.transformer) as captured:
            sample = self.transformer(*args, **kwargs)[0]
        return sample, self.head(captured.hidden_states)
