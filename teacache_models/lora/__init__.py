"""LoRA adapters on the native transformers (`LoraMixin`, inherited by every model) and the file layouts read."""

from .adapters import LoraMixin, adapter_names_list, check_lora_scale, lora_scale_from
from .files import read_lora
from .formats import formats_for, to_peft_layout
from .spec import LoraSpec, parse_lora_argument

__all__ = [
    "LoraMixin",
    "LoraSpec",
    "adapter_names_list",
    "check_lora_scale",
    "formats_for",
    "lora_scale_from",
    "parse_lora_argument",
    "read_lora",
    "to_peft_layout",
]
