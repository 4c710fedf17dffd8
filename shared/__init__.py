"""The contract between the gateway and the workers: schemas, names, codec, settings, storage."""
