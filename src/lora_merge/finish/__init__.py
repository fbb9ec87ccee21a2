"""Steps 5 and 6 of the flow: the output folder around the shards (index, config, tokenizer), made atomically."""
