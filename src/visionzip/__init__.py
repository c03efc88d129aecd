"""visionzip: send a vision-language model far fewer visual tokens (VisionZip, CVPR 2025)."""

from visionzip.api import apply, compress_vision, is_applied, prepare, remove
from visionzip.config import VisionZipConfig, split_budget
from visionzip.conversation import Conversation
from visionzip.core import Reduction
from visionzip.viz import visualize

__version__ = "0.1.0"

__all__ = [
    "Conversation",
    "Reduction",
    "VisionZipConfig",
    "__version__",
    "apply",
    "compress_vision",
    "is_applied",
    "prepare",
    "remove",
    "split_budget",
    "visualize",
]
