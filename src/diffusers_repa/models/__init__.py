from .transformer_sit import (
    SIT_PRESETS,
    SiTAttention,
    SiTAttnProcessor,
    SiTTransformer2DModel,
    SiTTransformer2DModelOutput,
)

__all__ = ["SIT_PRESETS", "SiTAttention", "SiTAttnProcessor", "SiTTransformer2DModel", "SiTTransformer2DModelOutput"]
