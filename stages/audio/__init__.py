"""Audio: constants, capture sources, resampling to 16 kHz mono, log-mel features."""
