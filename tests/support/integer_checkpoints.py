"""Integer-quantized weights laid out as the real writers lay them out, and decoded in float64.

compressed-tensors runs on a CPU, so its own compressor writes its tensors
(``tests/test_native_int.py`` calls it). GPTQ's and AWQ's writers need CUDA
(GPTQModel pulls a CUDA torch; AutoGPTQ and AutoAWQ build CUDA extensions), so
their layouts are rebuilt here from the packers' sources, as released checkpoints
carry them (e.g. TheBloke/Llama-2-7B-GPTQ: ``qweight`` int32 ``(in * bits / 32, out)``,
``qzeros`` int32 ``(groups, out * bits / 32)``, ``scales`` float16 ``(groups, out)``,
``g_idx`` int32 ``(in,)``; TheBloke/Llama-2-7B-AWQ: ``qweight`` int32 ``(in, out / 8)``,
``qzeros`` int32 ``(groups, out / 8)``, ``scales`` float16 ``(groups, out)``):

- GPTQ: AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py::QuantLinear.pack``
  packs ``32 // bits`` input rows per word, the first in the lowest bits, and
  (checkpoint_format ``gptq``, "v1") stores each zero point minus one; GPTQModel's
  ``gptq_v2`` stores the zero point itself.
- AWQ: AutoAWQ ``awq/modules/linear/gemm.py::WQLinear_GEMM.from_linear`` packs eight
  output columns per word in the order ``[0, 2, 4, 6, 1, 3, 5, 7]``, zeros likewise.

The float64 decoders here read the format's definition element by element
(integer shifts on int64 words, no unpacking helper of lora-merge): they are the
independent oracle of every decoder test.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _words(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack ``(n, m)`` codes along the last dimension, ``32 // bits`` per int32 word: the
    word's slot ``k`` (bits ``bits * k``) holds code ``order[k]`` of its run (``k`` itself
    without ``order``), as the packers' ``|= code << (bits * k)`` loops do."""
    per_word = 32 // bits
    n, m = codes.shape
    runs = codes.to(torch.int64).reshape(n, m // per_word, per_word)
    if order is not None:
        runs = runs[..., list(order)]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (runs << shifts).sum(-1)
    # The packers build uint32 words and store their bits as int32.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq(
    codes: torch.Tensor, zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qweight`` and ``qzeros`` of a GPTQ layer.

    Args:
        codes: ``(in, out)`` unsigned codes (the transposed weight, as GPTQ stores it).
        zeros: ``(groups, out)`` zero points, in ``1 .. 2**bits - 1`` for ``gptq`` (the
            v1 writer stores ``zero - 1``; a zero of 0 would be stored as -1 and spill
            into its neighbours, a known AutoGPTQ quirk no symmetric checkpoint meets).
        checkpoint_format: ``gptq`` (AutoGPTQ, v1) or ``gptq_v2`` (GPTQModel).
    """
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    qweight = _words(codes.t().contiguous(), bits).t().contiguous()
    return qweight, _words(stored_zeros, bits)


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qweight`` and ``qzeros`` of an AWQ GEMM layer (4-bit): ``codes`` ``(in, out)``,
    ``zeros`` ``(groups, out)``."""
    return _words(codes, 4, AWQ_ORDER), _words(zeros, 4, AWQ_ORDER)


def _code_at(words: torch.Tensor, bits: int, index: torch.Tensor) -> torch.Tensor:
    """Code number ``index`` of each row's bit stream (slot ``index % per_word`` of word
    ``index // per_word``), by integer shifts on int64."""
    per_word = 32 // bits
    word = words.to(torch.int64) & 0xFFFFFFFF
    picked = word.gather(-1, (index // per_word).expand(*word.shape[:-1], -1))
    return (picked >> ((index % per_word) * bits)) & ((1 << bits) - 1)


def gptq_float64(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str,
) -> torch.Tensor:
    """The ``(out, in)`` weight of a GPTQ layer in float64: ``scale * (q - zero)``."""
    inputs, outputs = g_idx.numel(), scales.shape[1]
    q = _code_at(qweight.t(), bits, torch.arange(inputs)).t()  # (in, out)
    z = _code_at(qzeros, bits, torch.arange(outputs))  # (groups, out)
    if checkpoint_format == "gptq":
        z = z + 1
    g = g_idx.long()
    return (scales.double()[g] * (q - z[g]).double()).t()


def awq_float64(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The ``(out, in)`` weight of an AWQ GEMM layer in float64."""
    outputs = scales.shape[1]
    # Output column 8c + m sits in slot k of word c where AWQ_ORDER[k] == m.
    slot = torch.tensor([AWQ_ORDER.index(m) for m in range(8)])
    index = (torch.arange(outputs) // 8) * 8 + slot[torch.arange(outputs) % 8]
    q = _code_at(qweight, 4, index)
    z = _code_at(qzeros, 4, index)
    g = torch.arange(qweight.shape[0]) // group_size
    return (scales.double()[g] * (q - z[g]).double()).t()


def compressed_tensors_float64(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """A compressed-tensors ``pack-quantized`` weight in float64, from its definition:
    codes along each row with an offset of ``2**(bits-1)``, zero points packed down the
    columns with the same offset, ``(q - zero) * scale`` per group of ``group_size``."""
    rows, columns = shape
    q = _code_at(packed, bits, torch.arange(columns)) - (1 << (bits - 1))
    scales = scale.double().reshape(-1, 1) if scale.numel() == 1 else scale.double()
    scales = scales.expand(rows, -1)
    groups = scales.shape[1]
    if zero_point is None:
        z = torch.zeros(rows, groups, dtype=torch.int64)
    elif zero_point.dtype == torch.int32:
        z = _code_at(zero_point.t(), bits, torch.arange(rows)).t() - (1 << (bits - 1))
    else:  # tensor strategy: one unpacked zero point
        z = zero_point.to(torch.int64).reshape(1, 1).expand(rows, 1)
    g = torch.arange(columns) // group_size if groups > 1 else torch.zeros(columns).long()
    return (q - z[:, g]).double() * scales[:, g]


def save_compressed_tensors_base(
    base_directory, directory, weights_args: dict, format: str, input_activations=None
):
    """Quantize the 16-bit checkpoint in ``base_directory`` with compressed-tensors, as
    llm-compressor does before it saves: ``apply_quantization_config``, min-max scales and
    zero points from ``calculate_qparams`` (llm-compressor's observers compute the same from
    calibration data), then compressed-tensors' ``ModelCompressor`` compresses the model
    and writes ``quantization_config`` (the real writer of these checkpoints).

    Args:
        weights_args: ``QuantizationArgs`` fields of the weights (num_bits, symmetric,
            strategy, group_size).
        format: ``pack-quantized`` or ``int-quantized``.
        input_activations: ``QuantizationArgs`` fields of the activations (W8A8), or None.
    """
    from compressed_tensors.compressors.model_compressors.model_compressor import (
        ModelCompressor,
    )
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_directory, dtype=torch.bfloat16)
    args = QuantizationArgs(**weights_args)
    activations = QuantizationArgs(**input_activations) if input_activations else None
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "quantization_scheme"):
                continue
            weight = module.weight.float()
            if args.strategy == "group":
                weight = weight.unflatten(-1, (-1, args.group_size))
                low, high = weight.amin(-1), weight.amax(-1)
            elif args.strategy == "channel":
                low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
            else:
                low, high = weight.amin().reshape(1), weight.amax().reshape(1)
            scale, zero_point = calculate_qparams(low, high, args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, format)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory


def compressed_tensors_decompressed(directory) -> dict[str, torch.Tensor]:
    """Every quantized weight of a compressed-tensors checkpoint, decompressed by
    compressed-tensors' own decompressor (``PackedQuantizationCompressor`` /
    ``IntQuantizationCompressor.decompress``) with the scheme its config names."""
    import json

    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from merge_oracle import read_safetensors_directory

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=group["weights"],
        input_activations=group.get("input_activations"),
    )
    packed = group.get("format", config["format"]) == "pack-quantized"
    compressor = PackedQuantizationCompressor if packed else IntQuantizationCompressor
    stored = read_safetensors_directory(directory)
    suffix = "weight_packed" if packed else "weight_scale"
    decompressed = {}
    for name in stored:
        if not name.endswith(suffix):
            continue
        prefix = name.removesuffix(suffix)
        state = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if k.startswith("weight")}
        decompressed[f"{prefix}weight"] = compressor.decompress(state, scheme)["weight"]
    return decompressed


def _round_to_nearest_codes(
    weight: torch.Tensor, groups: torch.Tensor, group_count: int, bits: int
):
    """Asymmetric round-to-nearest codes of ``weight`` ``(out, in)`` by input-feature group
    (what GPTQ's quantizer computes before its error correction, which only moves codes):
    codes ``(in, out)``, zero points ``(groups, out)`` in ``1 .. maxq``, float16 scales."""
    maxq = (1 << bits) - 1
    w = weight.double().t()  # (in, out)
    low = torch.stack([w[groups == g].amin(0) for g in range(group_count)]).clamp(max=0)
    high = torch.stack([w[groups == g].amax(0) for g in range(group_count)]).clamp(min=0)
    scales = ((high - low) / maxq).clamp(min=1e-5).half()
    zeros = torch.round(-low / scales.double()).clamp(1, maxq).long()
    codes = torch.round(w / scales.double()[groups] + zeros[groups]).clamp(0, maxq).long()
    return codes, zeros, scales


def save_gptq_base(
    base_directory, directory, bits: int, group_size: int, desc_act: bool, checkpoint_format: str
):
    """A 16-bit checkpoint's linears as GPTQ tensors (float16 scales), with the config
    GPTQModel writes (``quant_method``, ``bits``, ``group_size``, ``desc_act``, ``sym``,
    ``checkpoint_format``); everything else (embeddings, norms, ``lm_head``) as it was."""
    import json
    import shutil

    from merge_oracle import read_safetensors_directory
    from safetensors.torch import save_file

    shutil.copytree(base_directory, directory)
    tensors = read_safetensors_directory(directory)
    generator = torch.Generator().manual_seed(bits * 100 + group_size)
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        weight = tensors.pop(name)
        inputs = weight.shape[1]
        size = inputs if group_size == -1 else group_size
        count = inputs // size
        g_idx = torch.arange(inputs) // size
        if desc_act:
            g_idx = g_idx[torch.randperm(inputs, generator=generator)]
        codes, zeros, scales = _round_to_nearest_codes(weight, g_idx, count, bits)
        qweight, qzeros = pack_gptq(codes, zeros, bits, checkpoint_format)
        prefix = name.removesuffix("weight")
        tensors[f"{prefix}qweight"] = qweight
        tensors[f"{prefix}qzeros"] = qzeros
        tensors[f"{prefix}scales"] = scales
        tensors[f"{prefix}g_idx"] = g_idx.to(torch.int32)
    for shard in directory.glob("*.safetensors*"):
        shard.unlink()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": False,
        "checkpoint_format": checkpoint_format,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def save_awq_base(base_directory, directory, group_size: int):
    """A 16-bit checkpoint's linears as AWQ GEMM tensors, with AutoAWQ's config."""
    import json
    import shutil

    from merge_oracle import read_safetensors_directory
    from safetensors.torch import save_file

    shutil.copytree(base_directory, directory)
    tensors = read_safetensors_directory(directory)
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        weight = tensors.pop(name)
        inputs = weight.shape[1]
        groups = torch.arange(inputs) // group_size
        codes, zeros, scales = _round_to_nearest_codes(weight, groups, inputs // group_size, 4)
        qweight, qzeros = pack_awq(codes, zeros)
        prefix = name.removesuffix("weight")
        tensors[f"{prefix}qweight"] = qweight
        tensors[f"{prefix}qzeros"] = qzeros
        tensors[f"{prefix}scales"] = scales
    for shard in directory.glob("*.safetensors*"):
        shard.unlink()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def column_packed_float64(directory) -> dict[str, torch.Tensor]:
    """Every GPTQ/AWQ weight of a checkpoint decoded in float64 from the format's definition."""
    import json

    from merge_oracle import read_safetensors_directory

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    stored = read_safetensors_directory(directory)
    weights = {}
    for name in stored:
        if not name.endswith("qweight"):
            continue
        prefix = name.removesuffix("qweight")
        qweight, qzeros, scales = (stored[f"{prefix}{p}"] for p in ("qweight", "qzeros", "scales"))
        if config["quant_method"] == "gptq":
            weight = gptq_float64(
                qweight,
                qzeros,
                scales,
                stored[f"{prefix}g_idx"],
                config["bits"],
                config["checkpoint_format"],
            )
        else:
            weight = awq_float64(qweight, qzeros, scales, config["group_size"])
        weights[f"{prefix}weight"] = weight
    return weights
