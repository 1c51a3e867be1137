"""Evaluation: answers to prompts from a model or an endpoint, and the judges that score them."""
