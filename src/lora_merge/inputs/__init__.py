"""Step 1 of the flow: turn the user's paths into checked folders and file lists."""
