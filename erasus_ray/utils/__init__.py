"""Small shared utilities: seeding, devices, timing, model copies and hashes, atomic file writes."""

from erasus_ray.utils.atomic import atomic_open, atomic_savefig, atomic_torch_save, atomic_write_bytes, atomic_write_text
from erasus_ray.utils.common import Timer, clone_model, model_device, model_hash, seed_everything

__all__ = [
    "Timer",
    "atomic_open",
    "atomic_savefig",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "clone_model",
    "model_device",
    "model_hash",
    "seed_everything",
]
