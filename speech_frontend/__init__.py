"""speech_frontend."""
