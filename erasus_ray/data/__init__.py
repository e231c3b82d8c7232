"""Id-carrying datasets and loaders: every sample is addressed by a stable dataset id."""

from erasus_ray.data.ids import Batch, IdDataset, as_id_dataset, loader_batch_size, make_loader

__all__ = ["Batch", "IdDataset", "as_id_dataset", "loader_batch_size", "make_loader"]
