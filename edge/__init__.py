"""WellTegra edge agent: the on-premise half of the one-way connector (collectors, transform,
buffer, uploader). Not part of this release yet."""
