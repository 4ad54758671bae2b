"""The model in pure torch, batch-first: parameters, checkpoint loading, layers, KV cache, encoder, decoder."""
