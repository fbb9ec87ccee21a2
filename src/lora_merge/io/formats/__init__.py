"""Quantized checkpoint formats: one module per format, one table that lists them.

See :mod:`lora_merge.io.formats.protocol` for what a format provides and
:mod:`lora_merge.io.formats.registry` for the table and how a base's format is found.
"""
