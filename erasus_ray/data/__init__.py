"""Id-carrying datasets and loaders: every sample is addressed by a stable dataset id."""

from erasus_ray.data.ids import (
    Batch,
    IdDataset,
    as_id_dataset,
    check_finite_batch,
    check_finite_data,
    loader_batch_size,
    make_loader,
)

__all__ = [
    "Batch",
    "IdDataset",
    "as_id_dataset",
    "check_finite_batch",
    "check_finite_data",
    "loader_batch_size",
    "make_loader",
]
