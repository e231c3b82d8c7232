"""Small shared utilities: seeding, devices, timing, model copies and hashes."""

from erasus_ray.utils.common import Timer, clone_model, model_device, model_hash, seed_everything

__all__ = ["Timer", "clone_model", "model_device", "model_hash", "seed_everything"]
