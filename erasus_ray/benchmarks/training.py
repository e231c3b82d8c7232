"""Re-export of :mod:`erasus_ray.training` for benchmark modules."""

from erasus_ray.training import TrainRecipe, make_optimizer, train_model

__all__ = ["TrainRecipe", "make_optimizer", "train_model"]
