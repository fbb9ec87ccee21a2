"""Step 4 of the flow: read, merge, cast and write tensor data, chunk by chunk."""
