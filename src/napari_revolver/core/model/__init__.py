"""The guided network: encoder phi, guide g and segmentor f (Rakelly et al., arXiv 1806.07373)."""

from .encoder import Encoder, EncoderOutput
from .guide import Guide, GuideOutput
from .guided_net import GuidedNet
from .registry import available_models, build_model
from .segmentor import Segmentor

__all__ = [
    "Encoder",
    "EncoderOutput",
    "Guide",
    "GuideOutput",
    "GuidedNet",
    "Segmentor",
    "available_models",
    "build_model",
]
