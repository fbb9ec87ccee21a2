"""FP8 weights (E4M3 / E5M2) with float32 scales, in plain torch. Tensors in, tensors out.

Two layouts share the arithmetic:

- block-wise (``quant_method: fp8``, ``weight_block_size: [bm, bn]``; DeepSeek-V3/R1,
  Qwen3-*-FP8): ``weight_scale_inv[i // bm, j // bn]`` scales element ``(i, j)``;
  the grid is ``ceil(rows / bm) x ceil(cols / bn)``, so edge blocks may be partial;
- per-channel / per-tensor (compressed-tensors ``float-quantized``, fbgemm_fp8):
  ``weight_scale`` holds one value per output row, or one for the whole tensor.

Dequantizing is transformers' ``Fp8Dequantize._dequantize_one``
(``integrations/finegrained_fp8.py``): the code as float32 (exact), times its
scale in float32 (one rounding), then rounded once to the output dtype.
compressed-tensors' decompressor (``dequantize`` in
``quantization/lifecycle/forward.py``) multiplies in the scale's dtype instead;
its scale arrives here as float32 holding the same value, and the product is
rounded once to the scale's dtype in :func:`dequantize_fp8_channels` where it
must match (see there).

Re-quantizing block-wise (``--save-method merged_native``) is transformers'
``Fp8Quantize._quantize_one``: per block ``amax``, ``scale = 448 / amax``
(float32), ``weight_scale_inv = 1 / scale`` (float32; not always ``amax / 448``),
codes ``clamp(x * scale, -448, 448)`` rounded to E4M3, an all-zero block
getting scale 1. A partial edge block is quantized as if zero-padded (the
padding changes no ``amax``).
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Largest finite E4M3 value (torch.finfo(torch.float8_e4m3fn).max): transformers' _FP8_MAX.
FP8_E4M3_MAX = 448.0
# Rows dequantized at once are capped so that their float32 intermediate values stay
# within this many elements (1 MiB), whatever the tile.
FP8_CHUNK_ELEMENTS = 2**18


def scale_rows_for(start: int, stop: int, block_rows: int) -> tuple[int, int]:
    """``(first, last)``: the rows of a block-scale grid that cover weight rows ``start:stop``."""
    return start // block_rows, -(-stop // block_rows)


def dequantize_fp8_blocks(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    first_row: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of a block-wise FP8 weight to ``dtype``: ``(float32(q) * s) -> dtype``.

    Args:
        codes: ``(rows, cols)`` FP8 codes (float8_e4m3fn or float8_e5m2), weight rows
            ``first_row .. first_row + rows`` of the whole matrix.
        scales: float32 ``weight_scale_inv`` rows covering them (from grid row
            ``first_row // block[0]``), all ``ceil(cols / block[1])`` columns.
        block: ``(bm, bn)``, ``weight_block_size``.
        first_row: the index of ``codes``' first row in the whole matrix.
        dtype: the dtype to round to (the model's dtype; float32 keeps the product).
        out: ``(rows, cols)`` of ``dtype`` to write into; None: fresh memory.

    Returns:
        ``out`` (or a new tensor).
    """
    rows, cols = codes.shape
    block_rows, block_cols = block
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    full = cols - cols % block_cols
    chunk = max(1, FP8_CHUNK_ELEMENTS // max(cols, 1))
    for low in range(0, rows, chunk):
        high = min(rows, low + chunk)
        # The scale of each row's blocks: grid row (first_row + r) // bm.
        grid_rows = (
            torch.arange(first_row + low, first_row + high, device=codes.device).floor_divide_(
                block_rows
            )
            - first_row // block_rows
        )
        row_scales = scales.index_select(0, grid_rows)
        values = codes[low:high].to(torch.float32)
        if full:
            blocks = values[:, :full].view(high - low, full // block_cols, block_cols)
            blocks.mul_(row_scales[:, : full // block_cols, None])
        if full < cols:
            values[:, full:].mul_(row_scales[:, full // block_cols :])
        out[low:high].copy_(values)
    return out


def dequantize_fp8_channels(
    codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of a per-channel (or per-tensor) FP8 weight to ``dtype``: ``(float32(q) * s) -> dtype``.

    Args:
        codes: ``(rows, cols)`` FP8 codes.
        scales: float32, ``(rows, 1)`` (one per row) or ``(1, 1)`` (one for the tensor).
        dtype: the dtype to round to.
        out: ``(rows, cols)`` of ``dtype`` to write into; None: fresh memory.
    """
    rows, cols = codes.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    chunk = max(1, FP8_CHUNK_ELEMENTS // max(cols, 1))
    for low in range(0, rows, chunk):
        high = min(rows, low + chunk)
        values = codes[low:high].to(torch.float32)
        row_scales = scales if scales.shape[0] == 1 else scales[low:high]
        out[low:high].copy_(values.mul_(row_scales))
    return out


def quantize_fp8_blocks(
    values: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise E4M3 codes and ``weight_scale_inv`` of a run of whole block rows.

    transformers' ``Fp8Quantize._quantize_one`` (see the module docstring), for
    ``values`` of ``(rows, cols)`` where ``rows`` is a multiple of ``block[0]``
    except for the matrix's last block row; partial blocks quantized as if
    zero-padded.

    Returns:
        ``(codes, inv_scales)``: float8_e4m3fn ``(rows, cols)`` and float32
        ``(ceil(rows / bm), ceil(cols / bn))``.
    """
    rows, cols = values.shape
    block_rows, block_cols = block
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    padded = torch.zeros(
        grid[0] * block_rows, grid[1] * block_cols, dtype=torch.float32, device=values.device
    )
    padded[:rows, :cols] = values
    tiles = padded.view(grid[0], block_rows, grid[1], block_cols)
    max_abs = tiles.abs().amax(dim=(1, 3))
    ones = torch.ones_like(max_abs)
    # transformers: scales = 448 / safe_max_abs, 1 where the block is all zero.
    scales = torch.where(max_abs > 0, FP8_E4M3_MAX / torch.where(max_abs > 0, max_abs, ones), ones)
    inv_scales = (1.0 / scales).to(torch.float32)
    scaled = tiles * scales[:, None, :, None]
    codes = scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    codes = codes.view(grid[0] * block_rows, grid[1] * block_cols)[:rows, :cols]
    return codes.contiguous(), inv_scales
