from .lora_loader_sit import SiTLoraLoaderMixin
from .pipeline_sit import OUTPUT_TYPES, SiTPipeline, imagenet_id2label

__all__ = ["OUTPUT_TYPES", "SiTLoraLoaderMixin", "SiTPipeline", "imagenet_id2label"]
