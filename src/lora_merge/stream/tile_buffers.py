"""The byte buffers a thread's tiles reuse (:class:`TileBuffers`), shared by
:mod:`lora_merge.stream.tiles` and :mod:`lora_merge.stream.expert_tiles`."""

from __future__ import annotations

import torch


class TileBuffers:
    """The two byte buffers a shard's tiles reuse: one for rows read, one for rows written.

    Each tile is written before the next is read, so one of each suffices.

    Args:
        tile_bytes: a tile's merge workspace (see ``tile_budget_for``); most tiles read
            and write at most this many bytes.
        io_bytes: the size of each buffer (at least ``tile_bytes``): a LoRA product's
            tile reads this many, merged in blocks of ``tile_bytes`` (see ``tiles.output_tiles``).
    """

    def __init__(self, tile_bytes: int, io_bytes: int | None = None) -> None:
        self.tile_bytes = tile_bytes
        self.io_bytes = max(tile_bytes, io_bytes or 0)
        self.read = torch.empty(self.io_bytes, dtype=torch.uint8)
        self._output = torch.empty(self.io_bytes, dtype=torch.uint8)

    def output(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The output buffer viewed as ``shape`` of ``dtype``."""
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if nbytes > self._output.numel():  # a single row wider than a tile
            self._output = torch.empty(nbytes, dtype=torch.uint8)
        return self._output[:nbytes].view(dtype).view(shape)
