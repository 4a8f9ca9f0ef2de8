"""Training of the shipped demo model family: corpus and tokenizer, target LM."""
