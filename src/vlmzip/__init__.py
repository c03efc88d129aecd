"""visionzip: send a vision-language model far fewer visual tokens (VisionZip, CVPR 2025)."""

from vlmzip.api import apply, compress_vision, is_applied, prepare, remove
from vlmzip.cache import ImageCache
from vlmzip.config import VisionZipConfig, split_budget
from vlmzip.conversation import Conversation
from vlmzip.core import Reduction
from vlmzip.images import load_image
from vlmzip.viz import visualize

__version__ = "0.1.0"

__all__ = [
    "Conversation",
    "ImageCache",
    "Reduction",
    "VisionZipConfig",
    "__version__",
    "apply",
    "compress_vision",
    "is_applied",
    "load_image",
    "prepare",
    "remove",
    "split_budget",
    "visualize",
]
