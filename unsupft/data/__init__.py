"""Data sets as WebDataset shards: `open_samples` (what stages read, lazily), `read_info` (the
manifest) and `load_arrays` (a small set whole in memory).

See `unsupft.data.info` for the manifest, `unsupft.data.index` for the sample index and the
shards it accepts (foreign ones included), `unsupft.data.samples` for lazy reading,
`unsupft.data.shards` for writing, and `unsupft.data.ingest` for `unsupft ingest`.
"""

from unsupft.data.info import DatasetInfo, ShardInfo, read_info
from unsupft.data.reader import ArraySet, load_arrays
from unsupft.data.samples import Samples, open_samples

__all__ = ["ArraySet", "DatasetInfo", "Samples", "ShardInfo", "load_arrays", "open_samples", "read_info"]
