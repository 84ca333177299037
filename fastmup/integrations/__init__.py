"""μP for models defined by other libraries, without forking their code.

* :mod:`fastmup.integrations.transformers`: Hugging Face ``transformers``
  causal language models (GPT-2, Llama and models built like them) and the
  ``Trainer``.  Needs the optional extra ``pip install fastmup[hf]``.

Importing this package imports none of those libraries.
"""
