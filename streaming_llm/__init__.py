"""streaming_llm."""
