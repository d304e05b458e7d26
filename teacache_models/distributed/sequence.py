"""Sequence parallelism (Ulysses): the token sequence is split across the ranks of a group.

Every rank holds a contiguous shard of the tokens through the whole block stack. Around each attention
over the sharded sequence, one all-to-all turns "all heads of my tokens" into "my heads of all tokens",
attention runs on the full sequence for those heads, and a second all-to-all turns the result back.
Everything else in a transformer block works token by token, so it runs on the shard unchanged.

A sequence whose length the group size does not divide is padded at its end; the padded keys are masked
out of every attention and the padded rows are dropped when the shards are gathered.

Tokens that every rank holds in full (HunyuanVideo's text stream, joined after the image tokens) may
follow the shard in the same attention call: each rank takes its heads of them locally and the outputs
of all heads are gathered back, so the replicated stream stays identical on every rank.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..layers.attention import attention as local_attention

__all__ = ["SequenceParallel", "SequenceParallelMixin", "all_gather_tensor"]


def all_gather_tensor(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """One collective: (*S) on every rank -> (N, *S), rank order."""
    size = dist.get_world_size(group)
    tensor = tensor.contiguous().reshape(1, *tensor.shape)
    # The backends concatenate along dim 0: (N * 1, *S), viewed as (N, *S).
    output = tensor.new_empty((size, *tensor.shape[1:]))
    # torch >= 2.10 renamed all_gather_into_tensor; the old name still works but warns.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)
    return output


def _all_to_all(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """(N, ...) -> (N, ...): slice j goes to rank j; slice j of the result came from rank j."""
    tensor = tensor.contiguous()
    output = torch.empty_like(tensor)
    dist.all_to_all_single(output, tensor, group=group)
    return output


class SequenceParallel:
    """Ulysses sequence parallelism over the ranks of `group` (None: the default group).

    A model calls `begin(num_tokens)` once per forward with the full token count, then `shard` on every
    per-token tensor, runs its blocks on the shard with `attention` in place of plain attention for the
    attention over the sharded sequence, and `gather`s the per-token output before unpatchifying.
    One instance serves one forward call at a time.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call teacache_models.distributed.init_parallel() "
                "(or torch.distributed.init_process_group) before enabling sequence parallelism"
            )
        # The TeaCache reduction reads None as "no group", so the default group is named explicitly.
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the sequence-parallel group it was given")
        self.num_tokens: int | None = None

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, world_size={self.world_size})"

    # ---- the layout of the current forward -------------------------------------------------------

    def begin(self, num_tokens: int) -> None:
        """Declare the full length of the sequence the current forward shards."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < self.world_size:
            raise ValueError(
                f"a sequence of {num_tokens!r} tokens cannot be split over {self.world_size} ranks: "
                f"sequence parallelism needs at least as many tokens as ranks"
            )
        self.num_tokens = num_tokens

    def _length(self) -> int:
        if self.num_tokens is None:
            raise RuntimeError("SequenceParallel.begin(num_tokens) must be called before sharding")
        return self.num_tokens

    @property
    def shard_length(self) -> int:
        """Tokens per rank, padding included."""
        return -(-self._length() // self.world_size)

    @property
    def padded_length(self) -> int:
        """The full length after padding: `shard_length * world_size`."""
        return self.shard_length * self.world_size

    @property
    def shard_start(self) -> int:
        """Global index of this rank's first token."""
        return self.rank * self.shard_length

    def local_count(self, prefix: int) -> int:
        """How many of the global tokens [0, prefix) this rank holds (they are a prefix of its shard)."""
        return min(max(prefix - self.shard_start, 0), self.shard_length)

    @property
    def valid_length(self) -> int:
        """Real (unpadded) tokens in this rank's shard."""
        return self.local_count(self._length())

    # ---- per-token tensors ------------------------------------------------------------------------

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a tensor holding the full sequence along `dim` (zero-padded at the end)."""
        length = self._length()
        if tensor.shape[dim] != length:
            raise ValueError(
                f"cannot shard a tensor of shape {tuple(tensor.shape)} along dim {dim}: the sequence has "
                f"{length} tokens"
            )
        padding = self.padded_length - length
        if padding:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = padding
            tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        return tensor.narrow(dim, self.shard_start, self.shard_length)

    def gather(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's shard along `dim` -> the full sequence, padding dropped (one all-gather)."""
        if tensor.shape[dim] != self.shard_length:
            raise ValueError(
                f"cannot gather a tensor of shape {tuple(tensor.shape)} along dim {dim}: shards hold "
                f"{self.shard_length} tokens"
            )
        shards = all_gather_tensor(tensor.movedim(dim, 0), self.group)  # (N, Ls, ...)
        full = shards.flatten(0, 1)[: self._length()]  # (L, ...)
        return full.movedim(0, dim)

    def trim(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Drop this rank's padding rows from a per-token shard; a tensor without the shard length along
        `dim` (a per-sample value broadcast over tokens) is returned as it is."""
        if tensor.shape[dim] != self.shard_length:
            return tensor
        return tensor.narrow(dim, 0, self.valid_length)

    # ---- attention ----------------------------------------------------------------------------------

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.world_size:
            raise ValueError(
                f"sequence parallelism over {self.world_size} ranks splits the attention heads between them: "
                f"{num_heads} heads are not divisible by {self.world_size}; choose a degree dividing {num_heads}"
            )

    def _scatter_heads(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, Ls, H, D) shards -> (B, N * Ls, H / N, D) each, in one all-to-all."""
        n = self.world_size
        stacked = torch.stack(tensors)  # (T, B, Ls, H, D)
        count, batch, length, heads, head_dim = stacked.shape
        stacked = stacked.reshape(count, batch, length, n, heads // n, head_dim).permute(3, 0, 1, 2, 4, 5)
        received = _all_to_all(stacked, self.group)  # (N, T, B, Ls, H / N, D); slice j: rank j's tokens
        received = received.permute(1, 2, 0, 3, 4, 5).reshape(count, batch, n * length, heads // n, head_dim)
        return list(received.unbind(0))

    def _gather_heads_of_shard(self, out: torch.Tensor) -> torch.Tensor:
        """(B, N * Ls, H / N * D) over all tokens -> (B, Ls, H * D) over this rank's tokens."""
        n = self.world_size
        batch, _, width = out.shape
        out = out.reshape(batch, n, self.shard_length, width).transpose(0, 1)  # (N, B, Ls, H / N * D)
        received = _all_to_all(out, self.group)  # slice j: heads of rank j
        return received.permute(1, 2, 0, 3).reshape(batch, self.shard_length, n * width)

    def _key_mask(self, attn_mask: torch.Tensor | None, num_keys: int, device: torch.device) -> torch.Tensor | None:
        """The caller's mask with the padded keys of the sharded part masked out."""
        padding = self.padded_length - self._length()
        if attn_mask is not None and (attn_mask.ndim != 4 or attn_mask.shape[1] != 1):
            raise ValueError(
                "under sequence parallelism attn_mask must be (B or 1, 1, Lq or 1, keys): the heads are split "
                f"between ranks, so a per-head mask is not supported; got shape {tuple(attn_mask.shape)}"
            )
        if not padding:
            return attn_mask
        positions = torch.arange(num_keys, device=device)
        valid = (positions < self._length()) | (positions >= self.padded_length)  # (K,)
        valid = valid.reshape(1, 1, 1, num_keys)
        if attn_mask is None:
            return valid
        if attn_mask.dtype == torch.bool:
            return attn_mask & valid
        return attn_mask.masked_fill(~valid, float("-inf"))

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        replicated: int = 0,
    ) -> torch.Tensor:
        """Attention over the full sequence from this rank's shard, as `layers.attention` computes it.

        Args:
            query, key, value: (B, Ls + R, H, D): this rank's `shard_length` tokens of the sharded
                sequence, then `replicated` (R) tokens that every rank holds in full.
            attn_mask: None, or a boolean or additive mask (B or 1, 1, L' or 1, N * Ls + R) over the keys
                of the full layout: the padded sharded sequence, then the replicated tokens.
            replicated: R.

        Returns:
            (B, Ls + R, H * D): the rows of this rank's shard, then the replicated rows (all heads).
        """
        local = self.shard_length
        if query.shape[1] != local + replicated or key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
            raise ValueError(
                f"query, key and value must hold {local} sharded + {replicated} replicated tokens, got lengths "
                f"{query.shape[1]}, {key.shape[1]}, {value.shape[1]}"
            )
        heads = query.shape[2]
        self.check_heads(heads)
        if self.world_size == 1:
            return local_attention(query, key, value, attn_mask=attn_mask)
        parts = [query[:, :local], key[:, :local], value[:, :local]]
        if len({(p.dtype, p.shape) for p in parts}) == 1:
            q, k, v = self._scatter_heads(parts)
        else:
            q, k, v = (self._scatter_heads([p])[0] for p in parts)
        if replicated:
            # This rank's heads of the tokens it already holds in full: no communication.
            per_rank = heads // self.world_size
            mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
            q = torch.cat([q, query[:, local:, mine]], dim=1)  # (B, N * Ls + R, H / N, D)
            k = torch.cat([k, key[:, local:, mine]], dim=1)
            v = torch.cat([v, value[:, local:, mine]], dim=1)
        mask = self._key_mask(attn_mask, k.shape[1], k.device)
        out = local_attention(q, k, v, attn_mask=mask)  # (B, N * Ls + R, H / N * D)
        sharded = self._gather_heads_of_shard(out[:, : self.padded_length])  # (B, Ls, H * D)
        if not replicated:
            return sharded
        rest = all_gather_tensor(out[:, self.padded_length :], self.group)  # (N, B, R, H / N * D)
        rest = rest.permute(1, 2, 0, 3).flatten(2)  # (B, R, H * D), heads in rank order
        return torch.cat([sharded, rest], dim=1)


class SequenceParallelMixin:
    """`enable_sequence_parallel(group)` for a model; the model names its attention modules as class data.

    `sequence_parallel_attention` holds the names of the attention modules whose self-attention runs over
    the sharded token sequence, with `*` for a block index (`"blocks.*.attn1"`); each reads its
    `sequence_parallel` attribute (None: plain attention). `sequence_parallel_heads`, the head count they
    split, is the config's `num_attention_heads` unless the model says otherwise.
    """

    sequence_parallel_attention: ClassVar[tuple[str, ...]] = ()

    @property
    def sequence_parallel_heads(self) -> int:
        return self.config.num_attention_heads

    def sequence_parallel_modules(self) -> list[nn.Module]:
        """The modules `sequence_parallel_attention` names, in the model's module order."""
        if not self.sequence_parallel_attention:
            raise NotImplementedError(f"{type(self).__name__} does not support sequence parallelism")
        patterns = [re.compile(re.escape(name).replace(r"\*", r"\d+")) for name in self.sequence_parallel_attention]
        return [module for name, module in self.named_modules() if any(p.fullmatch(name) for p in patterns)]

    @property
    def sequence_parallel(self) -> SequenceParallel | None:
        return self.__dict__.get("_sequence_parallel")

    def enable_sequence_parallel(self, group: dist.ProcessGroup | SequenceParallel | None = None) -> SequenceParallel:
        """Split the token sequence of every forward over the ranks of `group` (None: the default group).

        The TeaCache decision is then shared by the same group, so every rank skips the same steps.
        """
        modules = list(self.sequence_parallel_modules())
        sp = group if isinstance(group, SequenceParallel) else SequenceParallel(group)
        sp.check_heads(self.sequence_parallel_heads)
        for module in modules:
            module.sequence_parallel = sp
        self.__dict__["_sequence_parallel"] = sp
        self.set_teacache_process_group(sp.group if sp.world_size > 1 else None, trim=sp.trim)
        return sp

    def disable_sequence_parallel(self) -> None:
        for module in self.sequence_parallel_modules():
            module.sequence_parallel = None
        self.__dict__["_sequence_parallel"] = None
        self.set_teacache_process_group(None)
