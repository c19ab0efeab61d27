"""The Llama 4 model: attention with iRoPE, MoE, vision encoder, the assembled model, weights I/O.

Knows nothing of training or serving."""
