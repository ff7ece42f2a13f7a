"""diffusers-repa: REPA (Representation Alignment for Generation) on Hugging Face diffusers.

Public names are imported lazily, so ``import diffusers_repa`` stays cheap and diffusers can resolve
``["diffusers_repa", "SiTTransformer2DModel"]`` entries of a ``model_index.json``.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "models": ["SIT_PRESETS", "SiTTransformer2DModel", "SiTTransformer2DModelOutput"],
    "schedulers": ["SiTODEScheduler", "SiTODESchedulerOutput", "SiTSDEScheduler", "SiTSDESchedulerOutput"],
    "pipelines": ["MMDiTPipeline", "SiTLoraLoaderMixin", "SiTPipeline", "imagenet_id2label"],
    "conversion": ["convert_repa_checkpoint", "export_to_repa_state_dict"],
    "models.transformer_mmdit": ["MMDiTTransformer2DModel", "MMDiTTransformer2DModelOutput"],
    "conversion_mmdit": ["convert_mmdit_checkpoint", "convert_mmdit_state_dict", "export_to_mmdit_state_dict"],
    "losses": ["REPALossOutput", "projection_loss", "repa_loss"],
    "ddpm_losses": [
        "DDPMLossTerms",
        "DDPMREPALossOutput",
        "DDPMSchedule",
        "improved_ddpm_loss",
        "improved_ddpm_repa_loss",
        "sample_ddpm_inputs",
    ],
    "repa_head": ["REPAHead", "TransformerWithREPAHead"],
    "encoders": [
        "ENCODER_ALIASES",
        "FrozenVisionEncoder",
        "check_token_grid",
        "interpolate_tokens",
        "load_encoder",
        "load_encoders",
        "save_tiny_random_encoder",
    ],
    "encoders.digits": ["pretrain_digits_encoder", "read_digits_encoder_record"],
    "data": [
        "LatentCacheInfo",
        "build_latent_cache",
        "center_crop_imagenet",
        "load_image_source",
        "load_latent_cache",
        "make_train_dataloader",
        "push_latent_cache_to_hub",
        "read_cache_info",
        "synthetic_class_dataset",
    ],
    "training": ["REPATrainer", "REPATrainingArguments"],
    "evaluation": [
        "analyze_alignment",
        "cka",
        "cknna",
        "compute_statistics",
        "evaluate_samples",
        "frechet_distance",
        "generate_samples",
        "inception_score",
        "linear_probe_accuracy",
        "load_fid_inception",
        "precision_recall",
    ],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS)
