from .flow_sampling import OUTPUT_TYPES
from .lora_loader_sit import SiTLoraLoaderMixin
from .pipeline_mmdit import MMDiTPipeline
from .pipeline_sit import COMPILE_MODES, SiTPipeline, imagenet_id2label

__all__ = ["COMPILE_MODES", "OUTPUT_TYPES", "MMDiTPipeline", "SiTLoraLoaderMixin", "SiTPipeline", "imagenet_id2label"]
