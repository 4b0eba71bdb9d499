"""Data layer: raw readers -> preparation (k-core, leave-one-out, one item index) -> registry."""
from pmmcache.data.images import (
    FolderImageStore,
    ImageStore,
    LmdbImageStore,
    ParquetImageStore,
    open_image_store,
)
from pmmcache.data.prepare import (
    PrepareConfig,
    PreparedDataset,
    combine,
    prepare,
    select_sources,
)
from pmmcache.data.readers import Problem, RawDataset, read_parquet, read_pmmrec, read_recbole
from pmmcache.data.registry import demo_domains, resolve_dataset

__all__ = [
    "FolderImageStore",
    "ImageStore",
    "LmdbImageStore",
    "ParquetImageStore",
    "open_image_store",
    "PrepareConfig",
    "PreparedDataset",
    "combine",
    "prepare",
    "select_sources",
    "Problem",
    "RawDataset",
    "read_parquet",
    "read_pmmrec",
    "read_recbole",
    "demo_domains",
    "resolve_dataset",
]
