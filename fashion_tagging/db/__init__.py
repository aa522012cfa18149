"""Catalog database: products, tags, embeddings (pgvector), model registry, runs and errors."""
