"""The merge arithmetic: pure functions of tensors, no I/O."""
