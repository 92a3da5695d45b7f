"""What distillation is made of: Q, the pairing of taps, the loss terms, the methods and Block-KD's stones."""
