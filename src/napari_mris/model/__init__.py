"""The token model: vocabulary layout, sequence building, the Llama decoder and decoding."""
