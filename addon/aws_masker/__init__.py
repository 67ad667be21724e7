"""aws-masker: mask AWS identifiers on their way to LLM APIs, restore them on the way back."""
