"""Files: atomic writes (bytes, text, JSON, figures) and model directories."""
