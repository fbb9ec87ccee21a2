"""Bytes on disk: safetensors headers, lazy tensor reads, streamed shard writes."""
