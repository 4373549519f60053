"""Values shared across the package; a leaf module that imports nothing of ours."""

# Labels equal to this are not scored (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100
