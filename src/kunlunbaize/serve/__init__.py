"""``kunlun serve``: an OpenAI-compatible HTTP server with continuous batching and speculative decoding."""
