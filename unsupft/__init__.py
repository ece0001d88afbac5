"""unsupft: get the best target model from a pretrained backbone, a source set and few target labels."""

__version__ = "0.1.0"
