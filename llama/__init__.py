"""tp-llama: tensor-parallel inference of Meta Llama checkpoints with DTensor and DCP."""
