"""The model-execution layer: loading, tokenization, batching and pooling. No HTTP in here."""
