"""One module per layer kind: its shape rule, its formula and the PEFT behaviour it reproduces.

Every kind adds ``scale * B @ A`` to a base weight (:mod:`lora_merge.compute.lora`
does that arithmetic, rounding once); what differs is which factor shapes fit
which weight, and how the adapter's tensors become the A and B of that product:

- :mod:`~lora_merge.plan.kinds.linear`: ``nn.Linear``, W (out, in).
- :mod:`~lora_merge.plan.kinds.conv1d`: transformers' Conv1D, W (in, out).
- :mod:`~lora_merge.plan.kinds.embedding`: ``nn.Embedding``, A and B the other way round.
- :mod:`~lora_merge.plan.kinds.convolution`: ``nn.Conv1d/2d/3d``, one flat row per channel.
- :mod:`~lora_merge.plan.kinds.merged_linear`: loralib's MergedLinear, B spread over groups.
- :mod:`~lora_merge.plan.kinds.experts`: PEFT ``target_parameters``, fused MoE experts.
- :mod:`~lora_merge.plan.kinds.dora`: DoRA's rescaling on top of any of the first four.
- :mod:`~lora_merge.plan.kinds.bias`: PEFT ``lora_bias``, added to the layer's bias.

:mod:`~lora_merge.plan.kinds.shapes` holds the checks every kind shares, and
:func:`~lora_merge.plan.kinds.factors.read_lora_factors` is the one reader of a
planned product's factors, for the stream and ``--verify`` alike.
"""
