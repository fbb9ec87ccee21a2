"""Adapter types other than LoRA that PEFT merges into the weights, one module per type.

Each module holds its type's shape rule, its formula and the PEFT code it
reproduces, as :mod:`lora_merge.plan.kinds` does for LoRA's layer kinds:

- :mod:`~lora_merge.plan.tuners.adalora`: AdaLoRA, ``W + B·(A⊙E)·alpha/ranknum``, its
  ranks pruned or not.
- :mod:`~lora_merge.plan.tuners.ia3`: IA3, ``W ⊙ l`` on rows (outputs), or on
  columns (inputs) for ``feedforward_modules``; the bias scaled with the rows.
- :mod:`~lora_merge.plan.tuners.loha`: LoHa, ``W + (W1a·W1b) ⊙ (W2a·W2b)·alpha/r``,
  and its CP (Tucker) form for convolutions.
- :mod:`~lora_merge.plan.tuners.lokr`: LoKr, ``W + kron(W1, W2)·alpha/r`` with W1 and W2
  each full or low-rank (W2 also in CP form).

:mod:`~lora_merge.plan.tuners.modules` plans every module of such an adapter
(a :class:`~lora_merge.plan.model.TunerUpdate` per tensor it changes), and
:func:`~lora_merge.plan.tuners.rows.tuner_row_merger` is what the stream calls to
merge a tile of rows: the type's update in the compute dtype, rounded once by the
caller. AdaLoRA, LoHa and LoKr are additive (their whole delta is built once per weight,
as PEFT's ``get_delta_weight`` builds it); IA3 multiplies.
"""
