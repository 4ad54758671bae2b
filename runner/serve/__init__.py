"""`voxtral-run serve`: a realtime transcription service (vLLM's and OpenAI's WebSocket dialects, OpenAI's HTTP
transcriptions) over a hub of streams."""
