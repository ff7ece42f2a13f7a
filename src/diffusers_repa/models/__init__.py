from .transformer_sit import SIT_PRESETS, SiTTransformer2DModel, SiTTransformer2DModelOutput

__all__ = ["SIT_PRESETS", "SiTTransformer2DModel", "SiTTransformer2DModelOutput"]
