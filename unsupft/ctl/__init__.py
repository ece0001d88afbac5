"""`unsupft-ctl`: pipelines of stages on the local machine or on Kubernetes."""
