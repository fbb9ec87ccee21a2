"""FP8 and MXFP4 checkpoints made at test time, and their formats decoded in float64.

The writers are the real libraries' own quantizers where they run on a CPU:

- block-wise FP8: transformers' fine-grained FP8 quantizer (``Fp8Quantize``, the op
  ``FineGrainedFP8Config`` runs when it saves a model; its ``from_pretrained`` path needs a
  GPU), with its config as ``FineGrainedFP8Config.to_dict()`` writes it. It leaves a weight
  whose sides are not multiples of the block unquantized; DeepSeek-V3's release has such
  weights quantized with partial edge blocks (``kv_a_proj_with_mqa``: 576 rows in blocks of
  128, ``weight_scale_inv`` (5, 56)), so :func:`quantize_fp8_blocks_float64` writes those, as
  DeepSeek's ``inference/kernel.py`` reads them.
- MXFP4: no CPU writer stores gpt-oss' layout (transformers' quantizer needs triton kernels),
  so :func:`gpt_oss_mxfp4_tensors` builds it as openai/gpt-oss-20b's ``model.safetensors``
  holds it: ``mlp.experts.gate_up_proj_blocks`` U8 (E, 2I, H/32, 16) and ``_scales`` U8
  (E, 2I, H/32), ``down_proj_blocks`` (E, H, I/32, 16) and ``_scales`` (E, H, I/32), the
  biases BF16, two E2M1 codes a byte (element 2k in the low nibble), one E8M0 exponent
  (bias 127) per 32 values; config ``{"quant_method": "mxfp4", "modules_to_not_convert":
  [...]}``.

The float64 decoders read the bits by the formats' definitions (OCP 8-bit floating point
and Microscaling specifications), not through torch's float8 casts.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

E4M3_BIAS = 7
E5M2_BIAS = 15
E8M0_BIAS = 127
MXFP4_BLOCK = 32
# E2M1 magnitudes by their three low bits (OCP MX spec, table 5).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def decode_e4m3_float64(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as float64 by the bits: s eeee mmm, bias 7, no infinities,
    0x7f/0xff NaN, subnormals ``m / 8 * 2**-6``."""
    bits = codes.view(torch.uint8).to(torch.int64)
    sign = torch.where(bits >= 128, -1.0, 1.0).double()
    exponent = (bits >> 3) & 0xF
    mantissa = (bits & 0x7).double()
    normal = (1 + mantissa / 8) * torch.pow(2.0, (exponent - E4M3_BIAS).double())
    subnormal = mantissa / 8 * 2.0 ** (1 - E4M3_BIAS)
    value = sign * torch.where(exponent == 0, subnormal, normal)
    return torch.where((bits & 0x7F) == 0x7F, torch.nan, value)


def decode_e5m2_float64(codes: torch.Tensor) -> torch.Tensor:
    """float8_e5m2 codes as float64 by the bits: s eeeee mm, bias 15, IEEE-like."""
    bits = codes.view(torch.uint8).to(torch.int64)
    sign = torch.where(bits >= 128, -1.0, 1.0).double()
    exponent = (bits >> 2) & 0x1F
    mantissa = (bits & 0x3).double()
    normal = (1 + mantissa / 4) * torch.pow(2.0, (exponent - E5M2_BIAS).double())
    subnormal = mantissa / 4 * 2.0 ** (1 - E5M2_BIAS)
    value = sign * torch.where(exponent == 0, subnormal, normal)
    special = torch.where(mantissa == 0, sign * torch.inf, torch.nan)
    return torch.where(exponent == 0x1F, special, value)


def decode_fp8_float64(codes: torch.Tensor) -> torch.Tensor:
    if codes.dtype == torch.float8_e5m2:
        return decode_e5m2_float64(codes)
    return decode_e4m3_float64(codes)


def dequantize_fp8_blocks_float64(
    codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """``q[i, j] * s[i // bm, j // bn]`` in float64 (exact: 4 + 24 significant bits), for the
    last two dimensions; partial edge blocks take their block's scale (DeepSeek's
    ``weight_dequant``)."""
    rows, cols = codes.shape[-2:]
    scales = scale_inv.double().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return decode_fp8_float64(codes) * scales[..., :rows, :cols]


def quantize_fp8_blocks_float64(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes and float32 ``weight_scale_inv`` per block, edge blocks partial: amax over
    the block's own elements, ``scale = 448 / amax`` in float32, as transformers' quantizer
    computes it for whole blocks."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(grid[0], block[0], grid[1], block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, 1.0), 1.0)
    codes = (tiles * scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes = codes.view(grid[0] * block[0], grid[1] * block[1])[:rows, :cols].contiguous()
    return codes, (1.0 / scale).float()


def decode_mxfp4_float64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss MXFP4 blocks (..., G, 16) and E8M0 scales (..., G) as float64 (..., G * 32):
    element 2k in the low nibble, ``e2m1 * 2**(scale - 127)``."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).to(torch.int64)
    magnitude = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)[codes & 0x7]
    value = torch.where(codes >= 8, -magnitude, magnitude)
    exponent = scales.to(torch.int64) - E8M0_BIAS
    scaled = value * torch.pow(2.0, exponent.double())[..., None]
    return scaled.flatten(-2)


def gpt_oss_mxfp4_tensors(
    prefix: str,
    experts: int,
    rows: int,
    cols: int,
    generator: torch.Generator,
    exponents: tuple[int, int] = (118, 124),
) -> dict[str, torch.Tensor]:
    """``{prefix}_blocks`` and ``{prefix}_scales`` of an MXFP4 expert tensor stored
    (experts, rows, cols) as gpt-oss stores it: random codes, exponents in ``exponents``."""
    groups = cols // MXFP4_BLOCK
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=generator)
    scales = torch.randint(*exponents, (experts, rows, groups), generator=generator)
    return {f"{prefix}_blocks": blocks.to(torch.uint8), f"{prefix}_scales": scales.to(torch.uint8)}


def fp8_quantizer(block: tuple[int, int]) -> tuple[Fp8Quantize, dict]:
    """transformers' fine-grained FP8 quantizer op and the config it saves."""
    config = FineGrainedFP8Config(weight_block_size=list(block))
    # The op reads only its quantizer's quantization_config.
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=config))
    return quantizer, json.loads(json.dumps(config.to_dict()))


def save_fp8_copy(base: Path, directory: Path, block: tuple[int, int]) -> Path:
    """``base`` with every linear projection quantized by transformers' FP8 quantizer."""
    quantizer, quantization_config = fp8_quantizer(block)
    tensors = {}
    for name, tensor in load_file(base / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors.update(quantizer.convert({name: tensor}))
        else:
            tensors[name] = tensor
    return save_quantized_model(base, directory, tensors, quantization_config)


def save_quantized_model(
    base: Path, directory: Path, tensors: dict[str, torch.Tensor], quantization_config: dict
) -> Path:
    """A new single-file model in ``directory``: ``tensors``, and ``base``'s config with
    ``quantization_config`` added."""
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return directory
