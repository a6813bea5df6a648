"""Reading and rewriting one request's KV pairs in vLLM's paged CPU cache, without assuming its page layout.

A layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``, but inside a (block, head) page
the CPU kernels choose the order (keys are stored transposed for some instruction sets). Writes therefore go
through vLLM's own ``cpu_attn_reshape_and_cache``; reads use the page layout *learned* from that same op: it
writes token and dimension codes into a scratch block once, and where each code lands gives the gather index.
"""

from __future__ import annotations

import torch

__all__ = ["PageLayout", "read_request", "write_request", "slots"]


class PageLayout:
    """Where key/value element ``(token t, dim d)`` of a block lives in the flat ``2 * block_size * head_dim`` page."""

    def __init__(self, write, kv_cache: torch.Tensor):
        _, heads, block, two_d = kv_cache.shape
        dim = two_d // 2
        if block > 256 or dim > 256 or kv_cache.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"cannot learn the page layout of a {kv_cache.dtype} cache with block_size={block}, head_dim={dim}: "
                "the plugin needs a float32/bfloat16/float16 cache (no fp8) with block_size and head_dim <= 256."
            )
        t = torch.arange(1, block + 1, dtype=torch.float32)[:, None, None].expand(block, heads, dim)
        d = torch.arange(1, dim + 1, dtype=torch.float32)[None, None, :].expand(block, heads, dim)
        codes = []
        for code in (t, d):  # small integers and their negatives are exact in every float dtype above
            scratch = torch.zeros((1, heads, block, two_d), dtype=kv_cache.dtype)
            write(code.to(kv_cache.dtype).contiguous(), (-code).to(kv_cache.dtype).contiguous(), scratch, torch.arange(block))
            codes.append(scratch[0, 0].flatten().float())
        token, dims = codes
        self.block, self.dim = block, dim
        self.key_index = self._index(token, dims, sign=1.0)
        self.value_index = self._index(token, dims, sign=-1.0)

    def _index(self, token: torch.Tensor, dims: torch.Tensor, sign: float) -> torch.Tensor:
        where = (token * sign > 0).nonzero().flatten()
        flat = ((token[where] * sign - 1) * self.dim + (dims[where] * sign - 1)).long()
        if where.numel() != self.block * self.dim or not torch.equal(flat.sort().values, torch.arange(flat.numel())):
            raise RuntimeError(
                "vLLM's cpu_attn_reshape_and_cache stores pages in a layout the kvpress_like plugin cannot read "
                "back (not a permutation of token x dim): this vLLM build is not supported."
            )
        index = torch.empty_like(flat)
        index[flat] = where
        return index  # index[t * dim + d] = flat page offset


def slots(block_ids: torch.Tensor, first: int, last: int, block: int) -> torch.Tensor:
    """Slot numbers of positions ``[first, last)`` of a request whose blocks are ``block_ids``."""
    pos = torch.arange(first, last)
    return block_ids[pos // block].long() * block + pos % block


def read_request(kv_cache: torch.Tensor, layout: PageLayout, block_ids: torch.Tensor, n: int) -> tuple:
    """Keys and values ``(kv_heads, n, head_dim)`` of the request's first ``n`` positions."""
    pages = kv_cache[block_ids.long()]  # (m, heads, block, 2 * dim): a copy
    m, heads = pages.shape[:2]
    flat = pages.reshape(m, heads, -1)

    def gather(index):
        out = flat[..., index].view(m, heads, layout.block, layout.dim)
        return out.permute(1, 0, 2, 3).reshape(heads, m * layout.block, layout.dim)[:, :n]

    return gather(layout.key_index), gather(layout.value_index)


def write_request(write, kv_cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_ids: torch.Tensor) -> None:
    """Write ``keys``/``values`` ``(kv_heads, k, head_dim)`` into ``slot_ids`` (k slots) through vLLM's op."""
    write(keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(), kv_cache, slot_ids)
