"""Real checkpoints: the weights manifest, Hub download, and memory-safe loading of native transformers.

    folder = resolve_weights("flux1-dev", token=...)             # manifest name, path or Hub id
    model = load_transformer(folder, FluxTransformer2DModel, torch_dtype=torch.bfloat16)
    model = FluxTransformer2DModel.from_pretrained("flux1-dev", torch_dtype="bfloat16")  # both at once
    model.save_pretrained("my-flux/transformer", max_shard_size="5GB")  # the diffusers layout

Importing this package reads no file and imports no huggingface_hub.
"""

from .checkpoint import open_checkpoint, read_safetensors_header, verify_sha256
from .conversion import FLUX_ORIGINAL, ORIGINAL_FORMATS, WAN_ORIGINAL, convert_state_dict
from .download import DownloadPlan, plan_download, resolve_weights
from .errors import CheckpointError, ManifestError, WeightsUnavailableError
from .loading import TORCH_DTYPES, from_pretrained, load_transformer
from .manifest import MANIFEST_PATH, ManifestEntry, load_manifest
from .saving import save_pretrained

__all__ = [
    "FLUX_ORIGINAL",
    "MANIFEST_PATH",
    "ORIGINAL_FORMATS",
    "TORCH_DTYPES",
    "WAN_ORIGINAL",
    "CheckpointError",
    "DownloadPlan",
    "ManifestEntry",
    "ManifestError",
    "WeightsUnavailableError",
    "convert_state_dict",
    "from_pretrained",
    "load_manifest",
    "load_transformer",
    "open_checkpoint",
    "plan_download",
    "read_safetensors_header",
    "resolve_weights",
    "save_pretrained",
    "verify_sha256",
]
