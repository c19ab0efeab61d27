"""Pre-training: the loop, MetaP, FP8, MoE load balancing, checkpoints, distributed. Uses the model;
the model knows nothing of it."""
