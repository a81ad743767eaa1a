"""`genserve bench`: a load generator for TGI and OpenAI streaming endpoints, and the side-by-side
comparison with llama.cpp's server and `transformers serve` (see bench/README.md)."""
