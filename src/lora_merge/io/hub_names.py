"""huggingface_hub's file-name constants, written out so that a local merge never imports it.

``import huggingface_hub.constants`` pulls in the package (about 0.05 s, more on a
loaded machine) for five strings; a merge of local folders needs no more of it.
The values are huggingface_hub's own (``huggingface_hub/constants.py``), and
``tests/test_startup.py`` checks that they still are.
"""

CONFIG_NAME = "config.json"
REPOCARD_NAME = "README.md"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_SINGLE_FILE = "model.safetensors"
# The largest safetensors header huggingface_hub reads (bytes): a longer one is refused.
SAFETENSORS_MAX_HEADER_LENGTH = 25_000_000
