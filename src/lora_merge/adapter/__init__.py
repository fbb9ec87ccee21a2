"""Step 2 of the flow: read the PEFT adapter (config, tensor keys, weights)."""
