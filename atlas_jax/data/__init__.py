"""Data: the synthetic task suite, stored records (TFDS / ArrayRecord, user JSONL), HF-exact image
preprocessing, and the Grain input pipeline that turns records into sharded batches."""
