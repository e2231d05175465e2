"""Task-agnostic graph networks over neural graphs."""

from lopt.nn.backbone import GraphBackbone
from lopt.nn.conv import NGConv

__all__ = ["GraphBackbone", "NGConv"]
