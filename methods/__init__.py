"""Built-in presses, registered through the same pluggy hook as third-party plugins."""

from kvpress_like.hookspecs import hookimpl

from .knorm import KnormPress
from .qfilters import QFilterPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress

__all__ = ["KnormPress", "QFilterPress", "SnapKVPress", "StreamingLLMPress"]


@hookimpl
def kvpress_like_presses() -> dict[str, type]:
    return {cls.name: cls for cls in (QFilterPress, KnormPress, SnapKVPress, StreamingLLMPress)}
