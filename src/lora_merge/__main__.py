"""``python -m lora_merge`` runs the CLI."""

from lora_merge.cli import main

if __name__ == "__main__":
    main()
