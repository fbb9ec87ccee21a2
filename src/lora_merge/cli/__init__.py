"""The ``lora-merge`` command line, one room, laid out as huggingface_hub's ``cli/``.

- :mod:`~lora_merge.cli.option_types`: the arguments and options, as shared ``Annotated`` aliases;
- :mod:`~lora_merge.cli.exit_codes`: errors as one line and an exit code, warnings as one line;
- :mod:`~lora_merge.cli.report`: the text printed about a run;
- :mod:`~lora_merge.cli.app`: the command itself, one call to the library, and :func:`main`.

The console script ``lora-merge`` is :func:`lora_merge.cli.main`.
"""

from lora_merge.cli.app import app, main

__all__ = ["app", "main"]
