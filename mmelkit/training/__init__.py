"""Training: the embedded scene-world CLIP (and, later, explanation-guided learning)."""
