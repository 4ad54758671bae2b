"""Audio and model stages of voxtral-run: pure cores with per-stream state and no sockets."""
