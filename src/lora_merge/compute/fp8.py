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
the FP8 code and the scale are exact in float32 and their product (at most
4 + 11 significant bits for a bf16/fp16 scale) is exact there, so rounding the
float32 product once to that dtype gives its bits.

Re-quantizing block-wise (``--save-method merged_native``) is transformers'
``Fp8Quantize._quantize_one``: per block ``amax``, ``scale = 448 / amax``
(float32), ``weight_scale_inv = 1 / scale`` (float32; not always ``amax / 448``),
codes ``clamp(x * scale, -448, 448)`` rounded to E4M3, an all-zero block
getting scale 1. A partial edge block is quantized as if zero-padded (the
padding changes no ``amax``).
"""

from __future__ import annotations

import torch

from lora_merge.compute.dequantize import DequantizeWorkspace

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Largest finite E4M3 value (torch.finfo(torch.float8_e4m3fn).max): transformers' _FP8_MAX.
FP8_E4M3_MAX = 448.0
# Rows dequantized at once are capped so that their float32 intermediate values stay
# within this many elements (1 MiB), whatever the tile.
FP8_CHUNK_ELEMENTS = 2**18


def scale_rows_for(start: int, stop: int, block_rows: int) -> tuple[int, int]:
    """``(first, last)``: the rows of a block-scale grid that cover weight rows ``start:stop``."""
    return start // block_rows, -(-stop // block_rows)


def fp8_value_table(codes_dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 values of ``codes_dtype``'s bit patterns (NaN codes give NaN).

    Looking codes up in it (``index_select``) gives the bits of ``codes.to(float32)``
    six times faster on a CPU (measured: 370 vs 60 M values/s on one core), since
    torch has no vectorized FP8 conversion there.
    """
    patterns = torch.arange(256, dtype=torch.uint8, device=device)
    return patterns.view(codes_dtype).to(torch.float32)


def fp8_pair_table(codes_dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """65536 int64 values: entry ``v`` holds the bits of the two float32 values of the codes
    whose bytes are those of ``v`` as a uint16, the first byte in memory first.

    Looking up two adjacent codes at once (their bytes viewed as one uint16) halves the
    gathers and the index conversion: 2x the value table's speed on a CPU (measured, one
    core, 1.0-1.6 G against 0.6-0.85 G values/s); the table (512 KiB) stays in cache.
    Built from the bytes of each uint16, so it is right on either byte order.
    """
    values = fp8_value_table(codes_dtype, device)
    patterns = torch.arange(2**16, dtype=torch.int32, device=device).to(torch.uint16)
    pairs = values[patterns.view(torch.uint8).view(2**16, 2).long()]
    return pairs.contiguous().view(torch.int64).reshape(-1)


def dequantize_fp8_blocks(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    first_row: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    workspace: DequantizeWorkspace | None = None,
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
        workspace: the calling thread's buffers (indices, float32 values, the value
            tables); None: fresh ones.

    Returns:
        ``out`` (or a new tensor).
    """
    rows, cols = codes.shape
    block_rows, block_cols = block
    if workspace is None:
        workspace = DequantizeWorkspace(codes.device)
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    # Codes looked up two at a time (fp8_pair_table) where a chunk's bytes can be viewed as
    # uint16: an even number of columns, on the CPU (the GPU keeps the byte table).
    paired = codes.device.type == "cpu" and cols % 2 == 0 and codes.storage_offset() % 2 == 0
    if paired:
        table = workspace.table(
            f"fp8.pairs.{codes.dtype}", lambda: fp8_pair_table(codes.dtype, codes.device)
        )
    else:
        table = workspace.table(
            f"fp8.{codes.dtype}", lambda: fp8_value_table(codes.dtype, codes.device)
        )
    full = cols - cols % block_cols
    chunk = max(1, FP8_CHUNK_ELEMENTS // max(cols, 1))
    grid_first = first_row // block_rows
    for low in range(0, rows, chunk):
        high = min(rows, low + chunk)
        count = (high - low) * cols
        chunk_bytes = codes[low:high].view(torch.uint8).reshape(-1)
        values = workspace.buffer("fp8_values", count, torch.float32)
        if paired:
            indices = workspace.buffer("fp8_indices", count // 2, torch.int32)
            indices.copy_(chunk_bytes.view(torch.uint16))
            torch.index_select(table, 0, indices, out=values.view(torch.int64))
        else:
            indices = workspace.buffer("fp8_indices", count, torch.int32)
            indices.copy_(chunk_bytes)
            torch.index_select(table, 0, indices, out=values)
        values = values.view(high - low, cols)
        # Rows low..high in runs that share a row of scales (grid row (first_row + r) // bm).
        row = low
        while row < high:
            grid_row = (first_row + row) // block_rows
            run_end = min(high, (grid_row + 1) * block_rows - first_row)
            run = values[row - low : run_end - low]
            row_scales = scales[grid_row - grid_first]
            if full:
                run[:, :full].view(run_end - row, full // block_cols, block_cols).mul_(
                    row_scales[: full // block_cols, None]
                )
            if full < cols:
                run[:, full:].mul_(row_scales[full // block_cols :])
            row = run_end
        out[low:high].copy_(values)
    return out


# Values one quantization step holds in float32 at once (1 MiB), whatever the weight's width.
FP8_QUANTIZE_CHUNK_ELEMENTS = 2**18


def quantize_fp8_blocks(
    values: torch.Tensor, block: tuple[int, int], power_of_two_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise E4M3 codes and ``weight_scale_inv`` of a run of whole block rows.

    transformers' ``Fp8Quantize._quantize_one`` (see the module docstring), for
    ``values`` of ``(rows, cols)`` where ``rows`` is a multiple of ``block[0]``
    except for the matrix's last block row; partial blocks quantized as if
    zero-padded.

    With ``power_of_two_scales`` (``scale_fmt: ue8m0``, DeepSeek-V3.1), each
    ``weight_scale_inv`` is rounded up to a power of two first and the codes are
    scaled by its exact reciprocal, as transformers does.

    Returns:
        ``(codes, inv_scales)``: float8_e4m3fn ``(rows, cols)`` and float32
        ``(ceil(rows / bm), ceil(cols / bn))``.
    """
    rows, cols = values.shape
    block_rows, block_cols = block
    grid = (-(-rows // block_rows), -(-cols // block_cols))
    # Blocks are quantized each on its own, so a run of block columns at a time gives
    # the same bits, holding float32 copies of that run only (DeepSeek-V3's o_proj: a
    # row of blocks is 128 x 16384, 8 MB in float32, four copies at once otherwise).
    step = block_cols * max(1, FP8_QUANTIZE_CHUNK_ELEMENTS // (grid[0] * block_rows * block_cols))
    if step >= cols:
        return _quantize_fp8_block_columns(values, block, power_of_two_scales)
    codes = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=values.device)
    inv_scales = torch.empty(grid, dtype=torch.float32, device=values.device)
    for first in range(0, cols, step):
        last = min(cols, first + step)
        run_codes, run_scales = _quantize_fp8_block_columns(
            values[:, first:last], block, power_of_two_scales
        )
        codes[:, first:last] = run_codes
        inv_scales[:, first // block_cols : -(-last // block_cols)] = run_scales
    return codes, inv_scales


def _quantize_fp8_block_columns(
    values: torch.Tensor, block: tuple[int, int], power_of_two_scales: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_blocks` of a run of whole block columns (or the matrix's last)."""
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
    if power_of_two_scales:
        tiny = torch.finfo(torch.float32).tiny
        inv_scales = torch.pow(2.0, torch.ceil(torch.log2(inv_scales.clamp(min=tiny))))
        scales = 1.0 / inv_scales
    scaled = tiles * scales[:, None, :, None]
    codes = scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    codes = codes.view(grid[0] * block_rows, grid[1] * block_cols)[:rows, :cols]
    return codes.contiguous(), inv_scales


def quantize_fp8_channels(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes and a scale per row, as compressed-tensors quantizes an FP8 ``channel``
    weight (``calculate_qparams`` over each row's min and max, then ``quantize``).

    Everything is computed in ``values``' dtype, as compressed-tensors does for a weight
    of that dtype: ``scale = amax / 448`` (its ``max / (bit_range / 2)``; an all-zero row
    gets the dtype's eps), codes ``clamp(x / scale, -448, 448)`` rounded to E4M3.

    Returns:
        ``(codes, scales)``: float8_e4m3fn ``(rows, cols)`` and ``(rows, 1)`` in ``values``' dtype.
    """
    dtype = values.dtype
    max_abs = values.abs().amax(dim=1, keepdim=True)
    half_range = torch.tensor(2 * FP8_E4M3_MAX, device=values.device).to(dtype) / 2
    scales = max_abs / half_range
    eps = torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=values.device)
    scales = torch.where(scales == 0, eps, scales)
    codes = (values / scales).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scales
