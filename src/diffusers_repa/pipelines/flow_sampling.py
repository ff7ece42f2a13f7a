"""What the REPA pipelines share (SiT class-conditional, MMDiT text-to-image): saving with their own code for plain
diffusers, loading as this package's classes, Hub snapshots of this package's components, the checks of the sampling arguments, the initial noise, decoding, the state of a running call that
callbacks read, and the guided sampling loop itself. Only the conditioning differs: class labels or text features."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from ..latents import vae_latent_shift_and_scale
from ..pretrained_paths import check_pretrained_source
from ..schedulers.scheduling_utils_sit import check_num_inference_steps, sampling_dtype

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Weight formats a download skips unless `use_safetensors=False` is passed: this package loads safetensors only.
_PICKLED_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]


class FlowSamplingMixin:
    """For a `DiffusionPipeline` with `transformer` (velocity model, t ∈ [0, 1], t = 1 noise), `vae` (or None in pixel
    space) and a SiT scheduler (or diffusers' flow-matching one). Saved folders carry the pipeline's code for plain
    diffusers (`save_pretrained`) and load back as this package's classes (`load_config`, `from_pretrained`). Classifier-free guidance runs only while the step's
    time lies in ``guidance_interval``, with the conditional and unconditional inputs as one doubled batch.
    """

    def save_pretrained(self, save_directory: str | Path, *, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus the code of the pipeline and of its components that are this package's
        classes, so that plain diffusers loads the folder without this package:
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

        The files are generated from the installed library (e.g. ``pipeline_sit.py``, ``transformer/transformer_sit.py``,
        ``scheduler/scheduling_sit_sde.py``; see `diffusers_repa.pipelines.hub_code`) and ``model_index.json`` names
        them; `from_pretrained` of these pipelines maps those names back to the library's classes. ``push_to_hub=True``
        then uploads like `push_to_hub` (``repo_id`` defaults to the folder's name; ``commit_message``, ``private``,
        ``token``, ``create_pr``); the other keyword arguments are diffusers' (``safe_serialization``, ``variant``,
        ``max_shard_size``).
        """
        from .hub_code import write_hub_code  # not at the top: the saved copy of this module leaves this method out

        upload_kwargs = {
            name: kwargs.pop(name)
            for name in ("repo_id", "commit_message", "private", "token", "create_pr")
            if name in kwargs
        }
        super().save_pretrained(save_directory, **kwargs)
        write_hub_code(self, save_directory)
        if push_to_hub:
            repo_id = upload_kwargs.pop("repo_id", Path(save_directory).name)
            save_kwargs = {name: kwargs[name] for name in ("safe_serialization", "variant") if name in kwargs}
            self.push_to_hub(repo_id, **upload_kwargs, **save_kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' `load_config`, with the ``model_index.json`` entries that name the code saved by
        `save_pretrained` (``["transformer_sit", "SiTTransformer2DModel"]``) mapped to this package's classes, so that
        `from_pretrained` builds the library's classes and never runs the saved files."""
        from .hub_code import library_model_index  # not at the top: the saved copy of this module leaves this out

        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return (library_model_index(loaded[0]), *loaded[1:])
        return library_model_index(loaded)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
        """diffusers' `from_pretrained`, after checking that a local path (``./x``, ``/x``, ``runs/x``) is a saved
        pipeline folder: a mistyped one is reported as such, not as an invalid repo id or a network problem."""
        check_pretrained_source(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """Fetch (or find in the cache) a snapshot of a Hub repository and return its local folder.

        diffusers' own `download` only resolves components whose classes live in diffusers or transformers and
        refuses this package's, so the snapshot comes straight from `huggingface_hub.snapshot_download`; with
        ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` it is served from the cache. Pickled weight files are
        skipped unless ``use_safetensors=False``. The code files that `save_pretrained` writes for plain diffusers
        come along but never run (see `load_config`). `from_pretrained` calls this for repo ids; local folders load
        directly.

        Keyword args used: ``cache_dir``, ``revision``, ``token``, ``force_download``, ``local_files_only``,
        ``use_safetensors``; diffusers' other download options are ignored.
        """
        return snapshot_download(
            pretrained_model_name,
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            force_download=bool(kwargs.get("force_download")),
            local_files_only=bool(kwargs.get("local_files_only")),
            ignore_patterns=None if kwargs.get("use_safetensors") is False else _PICKLED_WEIGHT_PATTERNS,
            user_agent={"pipeline_class": cls.__name__},
        )

    @staticmethod
    def _check_guidance_scale(guidance_scale: float, what: str = "guidance_scale") -> None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)):
            raise ValueError(f"{what} must be a number, got {type(guidance_scale).__name__} {guidance_scale!r}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(
                f"{what} must be a finite number (1 disables classifier-free guidance), got {guidance_scale}."
            )

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_interval: tuple[float, float],
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        """Raise a ValueError naming the first invalid sampling argument (``batch_size``: the number of images)."""
        check_num_inference_steps(num_inference_steps)
        self._check_guidance_scale(guidance_scale)
        if guidance_scale < 1:
            raise ValueError(
                f"guidance_scale must be >= 1 (1 disables classifier-free guidance), got {guidance_scale}."
            )
        if isinstance(guidance_interval, (str, bytes)) or not isinstance(guidance_interval, Sequence):
            raise ValueError(f"guidance_interval must be a pair (low, high), got {guidance_interval!r}.")
        if len(guidance_interval) != 2:
            raise ValueError(f"guidance_interval must be a pair (low, high), got {guidance_interval!r}.")
        low, high = guidance_interval
        if not 0 <= low <= high <= 1:
            raise ValueError(
                f"guidance_interval must satisfy 0 <= low <= high <= 1 (times, t = 1 noise), got {guidance_interval!r}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {batch_size} images; pass one generator per "
                "image, or a single generator."
            )
        if latents is not None:
            self.check_latents(latents, batch_size)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        in_channels = self.transformer.config.in_channels
        if output_type != "latent" and self.vae is None and in_channels != 3:
            raise ValueError(
                f"output_type={output_type!r} needs a VAE to decode the {in_channels}-channel latents, but this "
                "pipeline has vae=None (only a 3-channel, pixel-space transformer samples images without one); pass "
                "output_type='latent' or load the pipeline with a VAE."
            )
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}.")

    def check_latents(self, latents: torch.Tensor, batch_size: int) -> None:
        """Raise a ValueError unless `latents` is finite floating-point noise of the shape [`_latent_shape`] names."""
        expected = self._latent_shape(batch_size)
        if not isinstance(latents, torch.Tensor):
            raise ValueError(
                f"latents must be a torch.Tensor of shape {expected[:2]} + spatial, got {type(latents).__name__}."
            )
        shape = tuple(latents.shape)
        fits = isinstance(latents, torch.Tensor) and len(shape) == 4 and shape[:2] == expected[:2]
        if not fits or not self._latent_size_fits(*shape[2:]):
            batch, channels, spatial, note = expected
            got = shape if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"latents must have shape ({batch}, {channels}, {spatial}){note} (one per image), got {got}."
            )
        if not latents.is_floating_point():
            raise ValueError(
                f"latents must be a floating-point tensor (standard Gaussian noise at t = 1), got {latents.dtype}."
            )
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values; pass finite Gaussian noise at t = 1.")

    def _latent_shape(self, batch_size: int) -> tuple[int, int, str, str]:
        """(N, C, spatial size, a note on it) of the latents a call takes: here the transformer's sample_size."""
        size = self.transformer.config.sample_size
        return batch_size, self.transformer.config.in_channels, f"{size}, {size}", ""

    def _latent_size_fits(self, height: int, width: int) -> bool:
        size = self.transformer.config.sample_size
        return (height, width) == (size, size)

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        sample_size: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial state at t = 1, in the sampler's precision (float64; float32 on MPS) on ``device``.

        Drawn as float32 Gaussian noise of shape ``(batch_size, num_channels_latents, sample_size, sample_size)``
        (whatever the model dtype, as the original draws it: bf16 noise would be coarsely rounded), or ``latents``
        moved there when given.
        """
        if latents is None:
            shape = (batch_size, num_channels_latents, sample_size, sample_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return latents.to(device=device, dtype=sampling_dtype(device))

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance weight w of the running (or last) call; a callback may change it through
        ``pipe._guidance_scale``, which takes effect from the next step on."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether guidance is on at all (``guidance_scale > 1``); within a call it applies only inside
        ``guidance_interval``."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """Entries of ``scheduler.timesteps`` in the running (or last) call: the number of denoising steps, i.e. of
        `callback_on_step_end` calls (Heun: 2N − 1)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from a callback) to skip the remaining steps; the call then returns
        the current state, decoded."""
        return self._interrupt

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not yet clamped): the VAE decoding of latents ``z``, inverting ``z = (x − shift)·scale``
        (see `diffusers_repa.latents`), in the VAE's dtype; in pixel space the final sample itself, in float32."""
        if self.vae is None:
            return latents.float()
        latents = latents.to(self.vae.dtype)
        shift, scale = (value.to(latents) for value in vae_latent_shift_and_scale(self.vae.config))
        return self.vae.decode(latents / scale + shift).sample

    def _sample(
        self,
        latents: torch.Tensor,
        condition: Mapping[str, torch.Tensor],
        guided_condition: Mapping[str, torch.Tensor] | None,
        guidance_interval: tuple[float, float],
        generator: torch.Generator | list[torch.Generator] | None = None,
        step_noises: Sequence[torch.Tensor] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """Integrate `latents` from t = 1 to t = 0 with the scheduler (whose `set_timesteps` was called).

        Args:
            condition: the transformer's conditioning keyword arguments of the batch (e.g. ``class_labels``).
            guided_condition: the same for the doubled batch, conditional then unconditional; None when the call has
                no unconditional input (then guidance must stay off).
            step_noises: the Gaussian noise of each stochastic step, injected into the SDE scheduler's `step`.

        A step is guided when guidance is on and its time is inside ``guidance_interval`` (a Heun corrector keeps its
        predictor's decision); a callback may change ``_guidance_scale`` or set ``_interrupt``. The transformer is put
        in eval mode for the loop (label dropout would otherwise replace labels by the null class).
        """
        step_parameters = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in step_parameters else {}
        if step_noises is not None:
            expected = getattr(self.scheduler, "num_stochastic_steps", None)
            if "noise" not in step_parameters or expected is None:
                raise ValueError(
                    f"step_noises needs a scheduler that takes injected noise, not {type(self.scheduler)}."
                )
            if len(step_noises) != expected:
                raise ValueError(
                    f"step_noises must hold {expected} tensors for this schedule, got {len(step_noises)}."
                )
        # diffusers' flow-matching schedulers count time as t · num_train_timesteps; ours use t itself.
        time_scale = self.scheduler.config.get("num_train_timesteps", 1)
        low, high = guidance_interval
        device = latents.device
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)
            use_guidance = False
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    time = float(t) / time_scale
                    if getattr(self.scheduler, "state_in_first_order", True):
                        use_guidance = self.do_classifier_free_guidance and low <= time <= high
                    model_input = latents.to(self.transformer.dtype)
                    if use_guidance:
                        model_input = torch.cat([model_input, model_input])
                    timestep = torch.full((model_input.shape[0],), time, device=device, dtype=torch.float32)
                    velocity = self.transformer(
                        model_input,
                        timestep=timestep,
                        return_projections=False,
                        **(guided_condition if use_guidance else condition),
                    ).sample.to(latents.dtype)
                    if use_guidance:
                        conditional, unconditional = velocity.chunk(2)
                        velocity = unconditional + self.guidance_scale * (conditional - unconditional)
                    noise_kwargs = (
                        {"noise": step_noises[i]} if step_noises is not None and i < len(step_noises) else {}
                    )
                    latents = self.scheduler.step(
                        velocity, t, latents, **step_kwargs, **noise_kwargs, return_dict=False
                    )[0]

                    if callback_on_step_end is not None:
                        tensors = {"latents": latents}
                        callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", latents)
                        self._check_guidance_scale(self._guidance_scale, "guidance_scale set by callback_on_step_end")
                        if self.do_classifier_free_guidance and guided_condition is None:
                            raise ValueError(
                                "callback_on_step_end turned guidance on, but the call has no unconditional context "
                                "(input); start with guidance_scale > 1 or pass the unconditional input (e.g. "
                                "negative_prompt_embeds)."
                            )
                    progress_bar.update()
        finally:
            self.transformer.train(was_training)
        return latents

    def _output(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """The call's result: latents as they are, or decoded and post-processed images."""
        images = (
            latents
            if output_type == "latent"
            else self.image_processor.postprocess(self._decode(latents), output_type=output_type)
        )
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
