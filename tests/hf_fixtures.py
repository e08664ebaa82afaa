"""The tiny Hugging Face models of scripts/tiny_hf_model.py, for the tests."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "tiny_hf_model", Path(__file__).resolve().parents[1] / "scripts" / "tiny_hf_model.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

make_hf_chameleon = _module.make_hf_chameleon
make_hf_llama = _module.make_hf_llama
make_tokenizer = _module.make_tokenizer
_texts = _module._texts
