"""HET memory: the tokens the model wrongly predicted at each (training sample, position) in earlier steps.

The memory is bounded twice: at most `per_key` tokens per (sample, position), most recent first, and at
most `max_keys` entries in total, the least recently updated dropped first. It is saved with checkpoints
as plain tensors so that a resumed run uses exactly the same hard examples.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor


def sample_key(*parts: object) -> int:
    """A stable 63-bit id of a training sample (Python's `hash` of a str changes between runs)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class HETMemory:
    def __init__(self, per_key: int, max_keys: int) -> None:
        if per_key < 1 or max_keys < 1:
            raise ValueError(f"HET memory bounds must be positive, got per_key={per_key}, max_keys={max_keys}")
        self.per_key = per_key
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[int, int], list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: list[tuple[int, int]]) -> Tensor:
        """Remembered tokens for each key as (N, per_key), -1 where empty."""
        out = torch.full((len(keys), self.per_key), -1, dtype=torch.long)
        for row, key in enumerate(keys):
            tokens = self._entries.get(key)
            if tokens:
                out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out

    def update(self, keys: list[tuple[int, int]], tokens: list[int]) -> None:
        """Remember `tokens[i]` as a wrong prediction at `keys[i]` (most recent first, no duplicates)."""
        for key, token in zip(keys, tokens, strict=True):
            entry = self._entries.pop(key, [])
            if token in entry:
                entry.remove(token)
            entry.insert(0, int(token))
            self._entries[key] = entry[: self.per_key]
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def state_dict(self) -> dict[str, Tensor]:
        keys = torch.tensor(list(self._entries), dtype=torch.long).reshape(-1, 2)
        tokens = self.lookup(list(self._entries))
        return {"keys": keys, "tokens": tokens, "bounds": torch.tensor([self.per_key, self.max_keys])}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        per_key, max_keys = (int(v) for v in state["bounds"])
        if (per_key, max_keys) != (self.per_key, self.max_keys):
            raise ValueError(
                f"HET memory in the checkpoint has bounds {(per_key, max_keys)}, "
                f"the config asks for {(self.per_key, self.max_keys)}"
            )
        self._entries.clear()
        for key, row in zip(state["keys"].tolist(), state["tokens"].tolist(), strict=True):
            self._entries[(key[0], key[1])] = [t for t in row if t >= 0]
