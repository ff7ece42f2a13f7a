"""diffusers-repa: REPA (Representation Alignment for Generation) on Hugging Face diffusers."""

__version__ = "0.1.0"
