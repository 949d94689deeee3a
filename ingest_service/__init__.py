"""WellTegra ingest gateway: the cloud half of the one-way connector."""
