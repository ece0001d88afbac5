"""Data sets as WebDataset shards: `read_info`, `stream` (training) and `load_arrays` (small sets).

See `unsupft.data.info` for the manifest, `unsupft.data.shards` for the shard format and
`unsupft.data.ingest` for `unsupft ingest`.
"""

from unsupft.data.info import DatasetInfo, ShardInfo, read_info
from unsupft.data.reader import ArraySet, SampleStream, load_arrays, stream

__all__ = ["ArraySet", "DatasetInfo", "SampleStream", "ShardInfo", "load_arrays", "read_info", "stream"]
