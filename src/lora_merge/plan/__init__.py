"""Step 3 of the flow: decide, before any tensor data is read, what every output tensor is."""
