"""Built-in presses, registered through the same pluggy hook as third-party plugins."""

from kvpress_like.hookspecs import hookimpl

from .adaptive import AdaptivePress
from .expected_attention import ExpectedAttentionPress
from .keydiff import KeyDiffPress
from .knorm import KnormPress
from .kvzip import KVzipPress
from .qfilters import QFilterPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .targeted_qfilters import TargetedQFilterPress

__all__ = [
    "AdaptivePress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KnormPress",
    "KVzipPress",
    "QFilterPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TargetedQFilterPress",
]


@hookimpl
def kvpress_like_presses() -> dict[str, type]:
    builtin = (QFilterPress, KnormPress, SnapKVPress, StreamingLLMPress, TargetedQFilterPress, ExpectedAttentionPress,
               AdaptivePress, KeyDiffPress, KVzipPress)
    return {cls.name: cls for cls in builtin}
