"""Training losses that are not diffusion maths: adversarial terms for the tokenizer."""
