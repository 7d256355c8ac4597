"""gpt2-scratch: GPT-2 written from scratch in PyTorch, as a first-class Hugging Face `transformers` model.

Importing the package registers the classes with the Auto factories, so
`AutoModelForCausalLM.from_config(GPT2ScratchConfig())` works without remote code, and marks them for
`register_for_auto_class`, so `save_pretrained` writes `auto_map` and the code files and the checkpoint opens
anywhere with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gpt2_scratch import GPT2ScratchConfig
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchModel, GPT2ScratchPreTrainedModel

__all__ = ["GPT2ScratchConfig", "GPT2ScratchModel", "GPT2ScratchForCausalLM", "GPT2ScratchPreTrainedModel"]

AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
AutoModel.register(GPT2ScratchConfig, GPT2ScratchModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)

GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchModel.register_for_auto_class("AutoModel")
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
