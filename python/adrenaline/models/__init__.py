"""Models: the Llama-family decoder, the safetensors loader and the default model."""
