"""One layer's cache of keys and values that every denoising step shares (FLUX.2 [klein] KV's reference images,
Qwen-Image-2.1's prompt prefix): the first step stores them, the later ones read them."""

from __future__ import annotations

from typing import ClassVar

import torch

__all__ = ["KVLayerCache"]


class KVLayerCache:
    """One layer's keys and values after RoPE, (B, L, H, Dh) each.

    A family's subclass names the two attributes as diffusers' class of the same name does (`key_name`,
    `value_name`), so code written against diffusers' cache reads ours.
    """

    key_name: ClassVar[str] = "k"
    value_name: ClassVar[str] = "v"

    def __init__(self) -> None:
        self.clear()

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        setattr(self, self.key_name, key)
        setattr(self, self.value_name, value)

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = getattr(self, self.key_name), getattr(self, self.value_name)
        if key is None or value is None:
            raise RuntimeError("this KV cache layer is empty: fill the cache with a kv_cache_mode='extract' call first")
        return key, value

    def clear(self) -> None:
        setattr(self, self.key_name, None)
        setattr(self, self.value_name, None)
