"""The run of one merge, from checked settings to OUT; its modules, in the order of the run.

1. :mod:`~lora_merge.run.prepare`: resolve the inputs, read the adapter(s), plan;
2. :mod:`~lora_merge.run.preview`: or describe the plan and stop (``--dry-run``);
3. :mod:`~lora_merge.run.shards`: stream the planned tensors into shards;
4. :mod:`~lora_merge.run.folder`: OUT in its staging folder: the shards, then the
   index, config, side files and model card, and the rename into place;
5. :mod:`~lora_merge.run.merge`: the whole run, the Hub push, and its summary.

:mod:`lora_merge.api` is the public face of steps 2 and 5.
"""
