"""embedder: the plain library behind the embedding pipeline.

This package never imports prefect; `tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"
