"""The model registry: signed metadata (TUF), content-addressed blobs, atomic activation."""
