"""dsv4-nvfp4: DeepSeek V4 Pro release checkpoint -> NVFP4 checkpoint that vLLM serves."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("dsv4-nvfp4")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
