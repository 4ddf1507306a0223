"""Artifact stores: where bundles and TUF metadata live (MinIO/S3 in a cluster, a folder when embedded)."""
