"""Text: the Tekken tokenizer, incremental detokenization, transcript writers."""
