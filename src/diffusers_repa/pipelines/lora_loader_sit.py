"""LoRA loading and saving for [`SiTPipeline`], in the pattern of diffusers' transformer-only LoRA mixins."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE, LoraBaseMixin, _fetch_state_dict

from ..models.transformer_sit import convert_legacy_attention_keys


def _legacy_target_names(name: str) -> list[str]:
    """A LoRA target of the former attention layout under the current names (others unchanged).

    ``to_qkv`` (fused) became ``to_q``, ``to_k``, ``to_v``; ``to_out`` became ``to_out.0``.
    """
    head, _, last = name.rpartition(".")
    head = f"{head}." if head else ""
    if last == "to_qkv":
        return [f"{head}to_{projection}" for projection in "qkv"]
    if last == "to_out":
        return [f"{name}.0"]
    return [name]


def _convert_legacy_lora_metadata(metadata: dict, prefix: str) -> dict:
    """Rewrite the target modules and per-module rank / alpha patterns of an adapter saved for the former layout.

    A regular-expression ``target_modules`` (a string) is left as it is.
    """
    metadata = dict(metadata)
    targets = metadata.get(f"{prefix}target_modules")
    if isinstance(targets, (list, tuple, set)):
        metadata[f"{prefix}target_modules"] = [new for name in targets for new in _legacy_target_names(name)]
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = metadata.get(f"{prefix}{field}")
        if pattern:
            metadata[f"{prefix}{field}"] = {
                new: value for name, value in pattern.items() for new in _legacy_target_names(name)
            }
    return metadata


class SiTLoraLoaderMixin(LoraBaseMixin):
    r"""Load and save LoRA adapters of the pipeline's [`SiTTransformer2DModel`] (safetensors only).

    A LoRA file holds peft adapter weights under the prefix ``transformer.`` (as written by `save_lora_weights`);
    a bare ``get_peft_model_state_dict(transformer)`` dict without the prefix is accepted too. Adapter metadata (rank,
    alpha, target modules) stored by `save_lora_weights` is restored; without it the rank is read from the weights
    and alpha defaults to the rank. Adapters of the former attention layout (a fused ``attn.to_qkv`` and an
    ``attn.to_out`` without index) are converted to ``to_q``/``to_k``/``to_v``/``to_out.0`` on loading, exactly.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        **kwargs,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict | None]:
        """Read a LoRA state dict from a folder, a Hub repo (``weight_name`` picks the file) or a dict.

        Keyword args: ``weight_name``, ``subfolder``, ``cache_dir``, ``force_download``, ``local_files_only``,
        ``token``, ``revision`` (as in diffusers), and ``return_lora_metadata`` to also return the adapter metadata.
        Keys are returned with the ``transformer.`` prefix.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None),
            use_safetensors=True,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=None,
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=False,
        )
        if kwargs:
            raise ValueError(f"Unexpected keyword arguments for loading LoRA weights: {sorted(kwargs)}.")
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError(
                "Not a LoRA checkpoint: every parameter name must contain 'lora' (peft adapter weights, e.g. from "
                "`get_peft_model_state_dict(pipe.transformer)`)."
            )
        prefix = f"{cls.transformer_name}."
        if not any(key.startswith(prefix) for key in state_dict):
            state_dict = {prefix + key: value for key, value in state_dict.items()}
        if metadata and not any(key.startswith(prefix) for key in metadata):
            metadata = {prefix + key: value for key, value in metadata.items()}
        state_dict = convert_legacy_attention_keys(dict(state_dict))
        if metadata:
            metadata = _convert_legacy_lora_metadata(metadata, prefix)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Add a LoRA adapter to ``self.transformer`` (see `lora_state_dict` for the sources and keyword args).

        Args:
            adapter_name: name of the new adapter (default ``default_{i}``), for `set_adapters` / `delete_adapters`.
            hotswap: replace the weights of the existing adapter `adapter_name` in place.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        self.transformer.load_lora_adapter(
            state_dict,
            prefix=self.transformer_name,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor | torch.nn.Module],
        is_main_process: bool = True,
        weight_name: str | None = None,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """Write the transformer's LoRA weights to ``save_directory/weight_name`` (safetensors, written atomically).

        Args:
            transformer_lora_layers: ``get_peft_model_state_dict(transformer)`` (keys without the ``transformer.``
                prefix; it is added).
            is_main_process: only the main process writes (for distributed training).
            weight_name: file name, ``pytorch_lora_weights.safetensors`` by default.
            transformer_lora_adapter_metadata: the adapter's ``LoraConfig.to_dict()``, stored in the file header so
                that rank and alpha are restored exactly.
        """
        if not transformer_lora_layers:
            raise ValueError("transformer_lora_layers is empty: pass get_peft_model_state_dict(pipe.transformer).")
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        weight_name = weight_name or LORA_WEIGHT_NAME_SAFE
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-lora-") as staging:
            cls._save_lora_weights(
                save_directory=staging,
                lora_layers={cls.transformer_name: transformer_lora_layers},
                lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
                is_main_process=True,
                weight_name=weight_name,
                safe_serialization=True,
            )
            os.replace(Path(staging, weight_name), save_directory / weight_name)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active LoRA weights into the transformer (see diffusers' `LoraBaseMixin.fuse_lora`)."""
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora`."""
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)
