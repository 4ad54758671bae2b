"""Process, socket, configuration and timing layer of voxtral-run."""
